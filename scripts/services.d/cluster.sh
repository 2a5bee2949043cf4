# shellcheck shell=bash
# The cluster topology of scripts/services (TOPOLOGY=cluster); sourced by it,
# and built on its helpers (launch, claim_port, our_pid, probe, wait_ready):
#
#   redis-PORT  six redis-server processes in cluster mode on
#               REDIS_CLUSTER_PORT .. +5, created once as three masters with
#               one replica each; afterwards their nodes.conf files say who is
#               master (a failover moves that, and it is kept)
#   kafka-N     three Kafka nodes (node.id N), each broker and controller, on
#               KAFKA_CLUSTER_PORT .. +2, controllers on
#               KAFKA_CLUSTER_CONTROLLER_PORT .. +2; the storage of all three is
#               formatted once, with one cluster id and the three as the
#               initial controller quorum (the dynamic quorum of Kafka 4.x)
#
# Each process keeps its data, log and pid file in .services/cluster/NAME/.

readonly REDIS_CLUSTER_NODES=6
readonly KAFKA_CLUSTER_NODES=3
# Every one of the 16384 slots must be served for the cluster to be whole.
readonly REDIS_CLUSTER_SLOTS=16384
# Written once the Kafka storage is formatted: its cluster id and the
# initial controllers (id@host:port:directory-id), which fixes the
# controller ports for the life of that storage.
readonly KAFKA_BOOTSTRAP_FILE="$CLUSTER_DIR/kafka-bootstrap.properties"

# --- Names -------------------------------------------------------------------

# cluster_redis_nodes: the Redis Cluster's processes, one a line.
cluster_redis_nodes() {
  local i
  for ((i = 0; i < REDIS_CLUSTER_NODES; i++)); do
    echo "redis-$((REDIS_CLUSTER_PORT + i))"
  done
}

# cluster_kafka_nodes: the Kafka nodes' processes, one a line.
cluster_kafka_nodes() {
  local i
  for ((i = 1; i <= KAFKA_CLUSTER_NODES; i++)); do
    echo "kafka-$i"
  done
}

# is_cluster_process NAME: true if NAME is a process of the cluster topology.
is_cluster_process() {
  [[ -n "$1" ]] && { cluster_redis_nodes; cluster_kafka_nodes; } | grep -qxF -- "$1"
}

# kafka_node_controller_port NAME: the controller port of Kafka node NAME.
kafka_node_controller_port() {
  echo "$((KAFKA_CLUSTER_CONTROLLER_PORT + ${1#kafka-} - 1))"
}

# kafka_cluster_brokers: the bootstrap list of the Kafka cluster.
kafka_cluster_brokers() {
  local name list=""
  for name in $(cluster_kafka_nodes); do
    list+="${list:+,}$HOST:$(port_of "$name")"
  done
  echo "$list"
}

# cluster_env: the node settings for this topology, KEY=value a line.
cluster_env() {
  local name urls=""
  # Every other node is a seed too: a node starting while redis-7000 is
  # down (a fault test) still finds the cluster.
  for name in $(cluster_redis_nodes | tail -n +2); do
    urls+="${urls:+,}\"redis://$HOST:$(port_of "$name")\""
  done
  echo "SCALABLE_CHAT__REDIS__URL=redis://$HOST:$REDIS_CLUSTER_PORT"
  echo "SCALABLE_CHAT__REDIS__CLUSTER=true"
  echo "SCALABLE_CHAT__REDIS__URLS=[$urls]"
  echo "SCALABLE_CHAT__KAFKA__BROKERS=$(kafka_cluster_brokers)"
  echo "SCALABLE_CHAT__KAFKA__REPLICATION_FACTOR=$KAFKA_CLUSTER_NODES"
  echo "SCALABLE_CHAT__KAFKA__ALLOW_UNSAFE_DURABILITY=false"
  echo "SCALABLE_CHAT__MONGO__URL=mongodb://$HOST:$MONGO_PORT"
}

# --- Redis Cluster -----------------------------------------------------------

# redis_cli PORT ARGS...: run one redis-cli command against a node (reply
# without carriage returns; fails if the node does not answer).
redis_cli() {
  local port="$1"
  shift
  timeout 3 redis-cli -h "$HOST" -p "$port" "$@" 2>&1 | tr -d '\r'
}

# info_field INFO KEY: the value of KEY in a CLUSTER INFO reply.
info_field() {
  sed -n "s/^$2://p" <<<"$1"
}

# probe_redis_node NAME: PING the node and describe it: its role (master
# and its slots, or replica and its master's address) and the cluster's
# state as the node sees it (redis_cluster_whole waits for that).
probe_redis_node() {
  local port reply info nodes role state slots_ok
  port="$(port_of "$1")"
  if ! command -v redis-cli >/dev/null; then
    echo "redis-cli is not installed"
    return 1
  fi
  reply="$(redis_cli "$port" PING)" || true
  if [[ $reply != PONG ]]; then
    echo "$reply" | head -n 1
    return 1
  fi
  info="$(redis_cli "$port" CLUSTER INFO)" || true
  nodes="$(redis_cli "$port" CLUSTER NODES)" || true
  state="$(info_field "$info" cluster_state)"
  slots_ok="$(info_field "$info" cluster_slots_ok)"
  # A CLUSTER NODES line: id host:port@bus flags master-id ping pong epoch
  # link slot...; flags has "myself" on the node's own line.
  role="$(awk '
    { addr = $2; sub(/@.*/, "", addr); addr_of[$1] = addr }
    $3 ~ /myself/ { n = split($0, me, " ") }
    END {
      if (n == 0) { print "no cluster"; exit }
      if (me[3] ~ /slave/) { print "replica of " (me[4] in addr_of ? addr_of[me[4]] : me[4]); exit }
      slots = ""
      for (i = 9; i <= n; i++) slots = slots (slots == "" ? "" : ",") me[i]
      print "master " (slots == "" ? "(no slots)" : slots)
    }' <<<"$nodes")"
  echo "$role, cluster ${state:-?} (slots served ${slots_ok:-?})"
}

# start_redis_node NAME: start one node of the Redis Cluster unless it runs.
# Its nodes.conf (in its directory) keeps its id, its peers and its role.
start_redis_node() {
  start_redis_server "$1" --cluster-enabled yes --cluster-config-file nodes.conf \
    --cluster-node-timeout "$REDIS_CLUSTER_NODE_TIMEOUT"
}

# redis_cluster_form: create the cluster the first time, that is when all six
# nodes run and none has a peer or a slot yet; a cluster created before is
# left as its nodes say (its stopped nodes rejoin by themselves). Returns 1
# with a message when it can be neither (some nodes new, others not).
redis_cluster_form() {
  local name port info fresh=() joined=() absent=() addrs=()
  for name in $(cluster_redis_nodes); do
    port="$(port_of "$name")"
    addrs+=("$HOST:$port")
    if ! info="$(redis_cli "$port" CLUSTER INFO)" || [[ $info != *cluster_state:* ]]; then
      absent+=("$name")
    elif [[ $(info_field "$info" cluster_known_nodes) == 1 &&
      $(info_field "$info" cluster_slots_assigned) == 0 ]]; then
      fresh+=("$name")
    else
      joined+=("$name")
    fi
  done
  ((${#fresh[@]})) || return 0
  if ((${#joined[@]})); then
    error "redis cluster: new nodes ${fresh[*]} are not in the cluster of ${joined[*]};" \
      "add them (redis-cli --cluster add-node NEW EXISTING --cluster-slave), or remove" \
      "$(rel "$CLUSTER_DIR")/redis-* (all of the cluster's data) to create it anew"
    return 1
  fi
  if ((${#absent[@]})); then
    error "redis cluster: not created yet, and ${absent[*]} do not answer;" \
      "TOPOLOGY=cluster scripts/services up creates it"
    return 1
  fi
  log "redis cluster: creating it on ${addrs[*]} (three masters with one replica each)"
  mkdir -p "$CLUSTER_DIR"
  if ! redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes \
    </dev/null >>"$CLUSTER_DIR/redis-cluster.log" 2>&1; then
    log_tail "$CLUSTER_DIR/redis-cluster.log"
    error "redis cluster: redis-cli --cluster create failed"
    return 1
  fi
}

# redis_cluster_whole: true if every running node of ours sees the cluster
# ok with every slot served; otherwise prints which node does not.
redis_cluster_whole() {
  local name port info checked=0
  for name in $(cluster_redis_nodes); do
    our_pid "$name" >/dev/null || continue
    port="$(port_of "$name")"
    info="$(redis_cli "$port" CLUSTER INFO)" || { echo "$name does not answer"; return 1; }
    if [[ $(info_field "$info" cluster_state) != ok ||
      $(info_field "$info" cluster_slots_ok) != "$REDIS_CLUSTER_SLOTS" ]]; then
      echo "$name sees cluster_state $(info_field "$info" cluster_state)," \
        "$(info_field "$info" cluster_slots_ok) slots served"
      return 1
    fi
    checked=$((checked + 1))
  done
  ((checked)) || { echo "no node runs"; return 1; }
  echo "$checked nodes"
}

# redis_cluster_ready: create the cluster if it is new, then wait until it
# serves every slot (REDIS_CLUSTER_TIMEOUT seconds at most).
redis_cluster_ready() {
  local start=$SECONDS detail
  redis_cluster_form || return 1
  while true; do
    if detail="$(redis_cluster_whole)"; then
      log "redis cluster: every slot served, as $detail see it, after $((SECONDS - start))s"
      return 0
    fi
    if ((SECONDS - start >= REDIS_CLUSTER_TIMEOUT)); then
      error "redis cluster: not whole within ${REDIS_CLUSTER_TIMEOUT}s ($detail)"
      return 1
    fi
    sleep 0.5
  done
}

# --- Kafka cluster -----------------------------------------------------------

# kafka_nodes_running: how many of the Kafka nodes run as ours (at least 1):
# what a node's metadata must list, and the replicas every partition must
# have in sync, before `up` or `start` return (all three after `up`; two
# while one is killed).
kafka_nodes_running() {
  local name count=0
  for name in $(cluster_kafka_nodes); do
    our_pid "$name" >/dev/null && count=$((count + 1))
  done
  echo "$((count > 0 ? count : 1))"
}

# kafka_node_alone NAME: true if NAME is a Kafka node of the cluster and no
# other one runs. Its broker then cannot finish a controlled shutdown: that
# waits (five minutes) for the controllers to approve it, and one controller
# of three is no quorum. Killing it loses nothing written (its files stay,
# the next start recovers its logs), so stop_services does not wait that long.
kafka_node_alone() {
  local name
  [[ $1 == kafka-* ]] || return 1
  for name in $(cluster_kafka_nodes); do
    [[ $name == "$1" ]] || ! our_pid "$name" >/dev/null || return 1
  done
}

# kafka_cluster_controllers: the controller quorum, id@host:port a line
# (without directory ids).
kafka_cluster_controllers() {
  local name
  for name in $(cluster_kafka_nodes); do
    echo "${name#kafka-}@$HOST:$(kafka_node_controller_port "$name")"
  done
}

# render_kafka_node_config NAME: write NAME's server.properties.
render_kafka_node_config() {
  local name="$1" dir bootstrap
  dir="$(service_dir "$name")"
  bootstrap="$(kafka_cluster_controllers | sed 's/^[0-9]*@//' | paste -sd, -)"
  mkdir -p "$dir"
  sed -e "s|@NODE_ID@|${name#kafka-}|g" \
    -e "s|@KAFKA_PORT@|$(port_of "$name")|g" \
    -e "s|@KAFKA_CONTROLLER_PORT@|$(kafka_node_controller_port "$name")|g" \
    -e "s|@CONTROLLER_BOOTSTRAP@|$bootstrap|g" \
    -e "s|@KAFKA_DATA_DIR@|$dir/data|g" \
    "$CONF_DIR/kafka-cluster.properties.in" >"$dir/server.properties"
}

# kafka_uuids COUNT: COUNT random ids as Kafka writes them (16 random bytes,
# URL-safe base64 without padding, never starting with "-"), for the cluster
# id and the controllers' directory ids; one python3 run instead of one JVM
# start (StorageTool random-uuid) per id.
kafka_uuids() {
  python3 -c '
import base64, os, sys
for _ in range(int(sys.argv[1])):
    while True:
        uuid = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
        if not uuid.startswith("-"):
            print(uuid)
            break
' "$1"
}

# format_kafka_cluster: format the storage of the three nodes once, with one
# cluster id and the three as initial controllers (`--initial-controllers`,
# each with the directory id its node is formatted with). Formatted storage
# is kept; storage formatted for other controller ports, or only some of
# the three formatted, stops here with what to do.
format_kafka_cluster() {
  local name formatted=0 cluster_id controllers="" want have
  for name in $(cluster_kafka_nodes); do
    [[ -f "$(service_dir "$name")/data/meta.properties" ]] && formatted=$((formatted + 1))
  done
  if ((formatted == KAFKA_CLUSTER_NODES)); then
    want="$(kafka_cluster_controllers | paste -sd, -)"
    have="$(sed -n 's/^initial.controllers=//p' "$KAFKA_BOOTSTRAP_FILE" 2>/dev/null |
      sed 's/:[^:,]*\(,\|$\)/\1/g')"
    [[ -z "$have" || "$have" == "$want" ]] ||
      die "kafka: the cluster's storage was formatted for the controllers $have, not $want" \
        "(KAFKA_CLUSTER_CONTROLLER_PORT); use those ports, or remove $(rel "$CLUSTER_DIR")/kafka-*" \
        "(all of the cluster's data) to start it anew"
    return 0
  fi
  ((formatted == 0)) ||
    die "kafka: only $formatted of the cluster's $KAFKA_CLUSTER_NODES nodes have formatted storage;" \
      "remove $(rel "$CLUSTER_DIR")/kafka-* (all of the cluster's data) to start it anew"

  mkdir -p "$CLUSTER_DIR"
  local ids
  mapfile -t ids < <(kafka_uuids $((KAFKA_CLUSTER_NODES + 1)))
  cluster_id="${ids[0]}"
  local controller
  while read -r controller; do
    controllers+="${controllers:+,}$controller:${ids[${controller%%@*}]}"
  done < <(kafka_cluster_controllers)
  log "kafka: formatting the storage of $(cluster_kafka_nodes | paste -sd' ' -) (cluster id $cluster_id)"
  # Side by side: each format is a JVM start of several seconds.
  local pids=() failed=""
  for name in $(cluster_kafka_nodes); do
    render_kafka_node_config "$name"
    mkdir -p "$(service_dir "$name")/data"
    kafka_java kafka.tools.StorageTool format -t "$cluster_id" \
      --initial-controllers "$controllers" -c "$(service_dir "$name")/server.properties" \
      >"$(service_dir "$name")/format.log" 2>&1 9>&- &
    pids+=($!)
  done
  local i=0
  for name in $(cluster_kafka_nodes); do
    wait "${pids[i]}" || failed+=" $name"
    i=$((i + 1))
  done
  if [[ -n "$failed" ]]; then
    for name in $failed; do
      log_tail "$(service_dir "$name")/format.log"
    done
    # Nothing ran on this storage yet: start from nothing next time.
    for name in $(cluster_kafka_nodes); do
      rm -rf "$(service_dir "$name")/data"
    done
    die "kafka: formatting the storage failed for$failed"
  fi
  printf 'cluster.id=%s\ninitial.controllers=%s\n' "$cluster_id" "$controllers" >"$KAFKA_BOOTSTRAP_FILE"
}

# start_kafka_node NAME: start one Kafka node of the cluster unless it runs.
start_kafka_node() {
  local name="$1"
  if our_pid "$name" >/dev/null; then
    return 0
  fi
  claim_port "$name"
  render_kafka_node_config "$name"
  format_kafka_cluster
  log "$name: starting Apache Kafka $(kafka_version) on $HOST:$(port_of "$name")" \
    "(controller $(kafka_node_controller_port "$name"))"
  launch_kafka "$name" "$KAFKA_CLUSTER_HEAP"
}
