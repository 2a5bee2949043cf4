//! Turns the JSON results of one run (every repetition) into Markdown
//! tables and SVG charts, and copies the tables into the documents that
//! quote them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value;

use crate::proto::Error;

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(0.0)
}

const COLORS: [&str; 8] = [
    "#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// A line chart: one series of (x, y) points per system, log-scaled x.
fn line_svg(
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> String {
    let (w, h, l, r, t, bt) = (720.0, 400.0, 80.0, 170.0, 40.0, 50.0);
    let pts = series.iter().flat_map(|s| s.1.iter());
    let xmax = pts.clone().map(|p| p.0).fold(1.0f64, f64::max);
    let xmin = pts.clone().map(|p| p.0).fold(xmax, f64::min).max(1.0);
    let ymax = pts.map(|p| p.1).fold(1.0f64, f64::max) * 1.1;
    let lx = |x: f64| {
        let span = (xmax.ln() - xmin.ln()).max(1e-9);
        l + (x.max(xmin).ln() - xmin.ln()) / span * (w - l - r)
    };
    let ly = |y: f64| h - bt - y / ymax * (h - t - bt);
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15">{title}</text>
<line x1="{l}" y1="{}" x2="{}" y2="{}" stroke="black"/>
<line x1="{l}" y1="{t}" x2="{l}" y2="{}" stroke="black"/>
<text x="{}" y="{}" text-anchor="middle">{xlabel}</text>
<text x="16" y="{}" transform="rotate(-90 16 {})" text-anchor="middle">{ylabel}</text>
"##,
        w / 2.0,
        h - bt,
        w - r,
        h - bt,
        h - bt,
        (l + w - r) / 2.0,
        h - 10.0,
        h / 2.0,
        h / 2.0
    );
    for k in 0..=4 {
        let y = ymax * k as f64 / 4.0;
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" text-anchor="end">{}</text><line x1="{l}" y1="{}" x2="{}" y2="{}" stroke="#ddd"/>"##,
            l - 6.0,
            ly(y) + 4.0,
            human(y),
            ly(y),
            w - r,
            ly(y)
        );
    }
    let mut xs: Vec<f64> = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.0))
        .collect();
    xs.sort_by(|a, b| a.total_cmp(b));
    xs.dedup();
    for x in xs {
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" text-anchor="middle">{}</text>"##,
            lx(x),
            h - bt + 16.0,
            human(x)
        );
    }
    for (i, (name, p)) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let path: Vec<String> = p
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", lx(*x), ly(*y)))
            .collect();
        let _ = writeln!(
            s,
            r##"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"##,
            path.join(" ")
        );
        for (x, y) in p {
            let _ = writeln!(
                s,
                r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{c}"/>"##,
                lx(*x),
                ly(*y)
            );
        }
        let _ = writeln!(
            s,
            r##"<rect x="{}" y="{}" width="12" height="12" fill="{c}"/><text x="{}" y="{}">{name}</text>"##,
            w - r + 12.0,
            t + 20.0 * i as f64,
            w - r + 30.0,
            t + 20.0 * i as f64 + 10.0
        );
    }
    s.push_str("</svg>\n");
    s
}

/// A horizontal bar chart of one value per system.
fn bar_svg(title: &str, unit: &str, bars: &[(String, f64)]) -> String {
    let (w, l, row) = (720.0, 160.0, 28.0);
    let h = 60.0 + row * bars.len() as f64;
    let max = bars.iter().map(|b| b.1).fold(1e-9f64, f64::max);
    let mut s = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15">{title}</text>
"##,
        w / 2.0
    );
    for (i, (name, v)) in bars.iter().enumerate() {
        let y = 40.0 + row * i as f64;
        let bw = v / max * (w - l - 120.0);
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" text-anchor="end">{name}</text><rect x="{l}" y="{y}" width="{bw:.1}" height="{}" fill="{}"/><text x="{}" y="{}">{} {unit}</text>"##,
            l - 8.0,
            y + 15.0,
            row - 8.0,
            COLORS[i % COLORS.len()],
            l + bw + 6.0,
            y + 15.0,
            human(*v)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn human(v: f64) -> String {
    if !v.is_finite() {
        "–".into()
    } else if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// The order systems are listed in, whatever the order they ran in.
const ORDER: [&str; 8] = [
    "ours",
    "ours-w0",
    "raw",
    "socketio",
    "centrifugo",
    "centrifugo-pb",
    "centrifugo-history",
    "centrifugo-tuned",
];

fn rank(system: &str) -> usize {
    let base = system.strip_suffix("-2nodes").unwrap_or(system);
    ORDER.iter().position(|s| *s == base).unwrap_or(ORDER.len())
}

fn median(xs: &[f64]) -> f64 {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// "median (min–max)" of the repetitions, or the one value.
fn spread(xs: &[f64], fmt: fn(f64) -> String) -> String {
    let v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return "–".into();
    }
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if v.len() == 1 || fmt(lo) == fmt(hi) {
        fmt(median(&v))
    } else {
        format!("{} ({}–{})", fmt(median(&v)), fmt(lo), fmt(hi))
    }
}

/// Milliseconds, shown as any other figure.
fn ms(v: f64) -> String {
    num(v)
}

/// A figure: whole above 100, one decimal below, a dash when there is none.
fn num(v: f64) -> String {
    if !v.is_finite() {
        "–".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// Every result of one run directory: (workload, system) → one value per repetition.
struct Run {
    dir: String,
    groups: BTreeMap<(String, usize, String), Vec<Value>>,
}

impl Run {
    fn load(dir: &str) -> Result<Run, Error> {
        let mut files = Vec::new();
        let mut dirs = vec![Path::new(dir).to_path_buf()];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d)?.filter_map(|e| e.ok()) {
                let p = e.path();
                if p.is_dir() {
                    dirs.push(p);
                } else if p.extension().is_some_and(|x| x == "json") {
                    files.push(p);
                }
            }
        }
        files.sort();
        let mut groups: BTreeMap<_, Vec<Value>> = BTreeMap::new();
        for p in files {
            let v: Value = serde_json::from_str(&std::fs::read_to_string(&p)?)?;
            let w = v["workload"].as_str().unwrap_or("").to_string();
            let sys = v["system"].as_str().unwrap_or("").to_string();
            groups.entry((w, rank(&sys), sys)).or_default().push(v);
        }
        Ok(Run {
            dir: dir.to_string(),
            groups,
        })
    }

    /// The systems of a workload in the fixed order, each with its repetitions.
    fn of(&self, w: &str) -> Vec<(&str, &[Value])> {
        self.groups
            .iter()
            .filter(|((wl, _, _), _)| wl == w)
            .map(|((_, _, s), v)| (s.as_str(), v.as_slice()))
            .collect()
    }

    fn values(reps: &[Value], get: impl Fn(&Value) -> f64) -> Vec<f64> {
        reps.iter().map(get).collect()
    }
}

/// What ended each run's ladder: the load generator when it used 90% or
/// more of its core at the first step that was not sustained (the server's
/// figure is then a lower bound), else the server.
fn limit(reps: &[Value]) -> String {
    let mut gen = 0;
    let mut cpu = Vec::new();
    for r in reps {
        if let Some(s) = steps(r)
            .into_iter()
            .find(|s| s["sustained"] != Value::Bool(true) && f(s, "rate") > f(r, "sustained_rate"))
        {
            let c = f(&s, "load_generator_cpu_pct");
            cpu.push(c);
            if c >= 90.0 {
                gen += 1;
            }
        }
    }
    if cpu.is_empty() {
        return "the ladder's end".into();
    }
    let who = if gen * 2 > cpu.len() {
        "load generator"
    } else {
        "server"
    };
    format!(
        "{who} (load generator at {}% of its core)",
        num(median(&cpu))
    )
}

/// The sustained rates of the runs; a run that missed even the lowest
/// step is shown as below it.
fn sustained_cell(reps: &[Value]) -> String {
    let rates = key(reps, "sustained_rate");
    if rates.iter().all(|r| *r == 0.0) {
        let lowest = reps
            .iter()
            .flat_map(steps)
            .map(|s| f(&s, "rate"))
            .fold(f64::INFINITY, f64::min);
        return format!("below {}", num(lowest));
    }
    spread(&rates, num)
}

/// The values of one key, a run each.
fn key(reps: &[Value], k: &str) -> Vec<f64> {
    reps.iter().map(|r| f(r, k)).collect()
}

/// The sum of one key over the runs.
fn total(reps: &[Value], k: &str) -> f64 {
    reps.iter().map(|r| f(r, k)).sum()
}

fn steps(r: &Value) -> Vec<Value> {
    r["steps"].as_array().cloned().unwrap_or_default()
}

fn step_at(r: &Value, rate: f64) -> Option<Value> {
    steps(r).into_iter().find(|s| f(s, "rate") == rate)
}

fn causes(reps: &[Value]) -> String {
    let mut all: BTreeMap<String, u64> = BTreeMap::new();
    for r in reps {
        let mut lists = vec![r["drop_causes"].clone()];
        lists.extend(steps(r).iter().map(|s| s["drop_causes"].clone()));
        for c in lists {
            if let Some(m) = c.as_object() {
                for (k, v) in m {
                    *all.entry(k.clone()).or_insert(0) += v.as_u64().unwrap_or(0);
                }
            }
        }
    }
    if all.is_empty() {
        return "none".into();
    }
    all.iter()
        .map(|(k, v)| format!("{v}× {k}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The tables of one run, by name (the names the documents quote).
fn tables(run: &Run) -> Result<Vec<(String, String)>, Error> {
    let mut out = Vec::new();
    for (w, key) in [("fanout", "w1"), ("crossnode", "w4")] {
        let rs = run.of(w);
        if rs.is_empty() {
            continue;
        }
        let mut md = String::new();
        let _ = writeln!(md, "| system | sustained rate, msgs/s | deliveries/s at it | p50 / p99 / p99.9 ms at it | server CPU % at it | what stopped it | server RSS MiB | subscribers dropped below saturation | why dropped (all steps) | runs |");
        let _ = writeln!(md, "|---|---:|---:|---|---:|---:|---:|---:|---|---:|");
        for (sys, reps) in &rs {
            let at = |k: &'static str| {
                Run::values(reps, move |r| {
                    step_at(r, f(r, "sustained_rate")).map_or(f64::NAN, |s| f(&s, k))
                })
            };
            let _ = writeln!(
                md,
                "| {sys} | {} | {} | {} / {} / {} | {} | {} | {} | {:.0} | {} | {} |",
                sustained_cell(reps),
                spread(&at("delivered_per_sec"), human),
                ms(median(&at("p50_ms"))),
                ms(median(&at("p99_ms"))),
                ms(median(&at("p999_ms"))),
                num(median(&at("server_cpu_pct"))),
                limit(reps),
                num(median(&at("server_rss_mib"))),
                total(reps, "drops_below_saturation"),
                causes(reps),
                reps.len()
            );
        }
        out.push((format!("{key}-sustained"), md));

        let mut rates: Vec<f64> = rs
            .iter()
            .flat_map(|(_, reps)| reps.iter().flat_map(steps))
            .map(|s| f(&s, "rate"))
            .collect();
        rates.sort_by(f64::total_cmp);
        rates.dedup();
        let mut md = String::from("| system |");
        for r in &rates {
            let _ = write!(md, " {r:.0}/s |");
        }
        md.push_str("\n|---|");
        for _ in &rates {
            md.push_str("---|");
        }
        md.push('\n');
        for (sys, reps) in &rs {
            let _ = write!(md, "| {sys} |");
            for rate in &rates {
                let at: Vec<Value> = reps.iter().filter_map(|r| step_at(r, *rate)).collect();
                if at.is_empty() {
                    md.push_str(" |");
                    continue;
                }
                let q = |k| median(&at.iter().map(|s| f(s, k)).collect::<Vec<_>>());
                let kept = at
                    .iter()
                    .filter(|s| s["sustained"] == Value::Bool(true))
                    .count();
                let mark = if kept * 2 > at.len() {
                    ""
                } else if at.iter().any(|s| s["saturated"] == Value::Bool(true)) {
                    " sat."
                } else {
                    " ✗"
                };
                let _ = write!(
                    md,
                    " {} / {} / {}{mark} |",
                    ms(q("p50_ms")),
                    ms(q("p99_ms")),
                    ms(q("p999_ms"))
                );
            }
            md.push('\n');
        }
        out.push((format!("{key}-ladder"), md));

        let series: Vec<(String, Vec<(f64, f64)>)> = rs
            .iter()
            .map(|(sys, reps)| {
                let pts = rates
                    .iter()
                    .filter_map(|rate| {
                        let v: Vec<f64> = reps
                            .iter()
                            .filter_map(|r| step_at(r, *rate))
                            .map(|s| f(&s, "delivered_per_sec"))
                            .collect();
                        (!v.is_empty()).then(|| (*rate, median(&v)))
                    })
                    .collect();
                (sys.to_string(), pts)
            })
            .collect();
        std::fs::write(
            format!("{}/{w}.svg", run.dir),
            line_svg(
                &format!(
                    "{} fan-out: delivered msgs/s (median of runs)",
                    key.to_uppercase()
                ),
                "publish rate (msgs/s, log scale)",
                "delivered msgs/s",
                &series,
            ),
        )?;
    }

    let rs = run.of("rooms");
    if !rs.is_empty() {
        let mut md = String::new();
        let _ = writeln!(md, "| system | connected / clients | delivered msgs/s (expected) | p50 / p99 / p99.9 ms | p99 ms over runs | errors | dropped | server CPU % | server RSS MiB | runs |");
        let _ = writeln!(md, "|---|---|---:|---|---:|---:|---:|---:|---:|---:|");
        for (sys, reps) in &rs {
            let _ = writeln!(
                md,
                "| {sys} | {:.0} / {:.0} | {} ({}) | {} / {} / {} | {} | {:.0} | {:.0} | {} | {} | {} |",
                median(&key(reps, "connected")),
                median(&key(reps, "clients")),
                human(median(&key(reps, "delivered_per_sec"))),
                human(median(&key(reps, "expected_delivered_per_sec"))),
                ms(median(&key(reps, "p50_ms"))),
                ms(median(&key(reps, "p99_ms"))),
                ms(median(&key(reps, "p999_ms"))),
                spread(&key(reps, "p99_ms"), ms),
                total(reps, "errors"),
                total(reps, "dropped"),
                num(median(&key(reps, "server_cpu_pct"))),
                num(median(&key(reps, "server_rss_mib"))),
                reps.len()
            );
        }
        out.push(("w2".into(), md));
    }

    let rs = run.of("idle");
    if !rs.is_empty() {
        let mut md = String::new();
        let _ = writeln!(md, "| system | connected / clients | KiB per connection | connects/s | time to accept all, s | RSS after MiB | dropped | runs |");
        let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|");
        let mut bars = Vec::new();
        for (sys, reps) in &rs {
            let accept = Run::values(reps, |r| {
                f(r, "connected") / f(r, "connect_per_sec").max(1e-9)
            });
            let _ = writeln!(
                md,
                "| {sys} | {:.0} / {:.0} | {} | {} | {} | {} | {:.0} | {} |",
                median(&key(reps, "connected")),
                median(&key(reps, "clients")),
                spread(&key(reps, "kib_per_connection"), num),
                spread(&key(reps, "connect_per_sec"), num),
                spread(&accept, num),
                num(median(&key(reps, "rss_after_mib"))),
                total(reps, "dropped"),
                reps.len()
            );
            bars.push((sys.to_string(), median(&key(reps, "kib_per_connection"))));
        }
        std::fs::write(
            format!("{}/idle.svg", run.dir),
            bar_svg(
                "W3 memory per idle connection (median of runs)",
                "KiB",
                &bars,
            ),
        )?;
        out.push(("w3".into(), md));
    }

    let rs = run.of("durable");
    if !rs.is_empty() {
        let mut md = String::new();
        let _ = writeln!(md, "| system | clients × window | accepted (acked) msgs/s | acked, all runs | lost, all runs | documents in MongoDB | drain s | runs |");
        let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|");
        for (sys, reps) in &rs {
            let docs: Vec<String> = reps
                .iter()
                .map(|r| {
                    r.get("mongo_documents")
                        .map_or_else(|| "not counted".to_string(), |n| n.to_string())
                })
                .collect();
            let _ = writeln!(
                md,
                "| {sys} | {:.0} × {:.0} | {} | {:.0} | {:.0} | {} | {} | {} |",
                median(&key(reps, "clients")),
                median(&key(reps, "window")),
                spread(&key(reps, "acked_per_sec"), num),
                total(reps, "acked_total"),
                total(reps, "lost"),
                docs.join(", "),
                spread(&key(reps, "drain_secs"), num),
                reps.len()
            );
        }
        out.push(("w5".into(), md));
    }

    let rs = run.of("storm");
    if !rs.is_empty() {
        out.push(("w6".into(), storm_table(&rs)));
    }

    if let Some(goals) = goals(run) {
        out.push(("goals".into(), goals));
    }
    Ok(out)
}

fn storm_table(rs: &[(&str, &[Value])]) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "| system | resumed / dropped | time until all resumed, s | messages missed, all runs | duplicates, all runs | steady clients p50 / p99 ms before → during the storm | server RSS MiB at the peak | runs |");
    let _ = writeln!(md, "|---|---|---:|---:|---:|---|---:|---:|");
    for (sys, reps) in rs {
        let lat = |when: &'static str, q: &'static str| {
            ms(median(&Run::values(reps, move |r| {
                f(&r["steady_latency"][when], q)
            })))
        };
        let _ = writeln!(
            md,
            "| {sys} | {:.0} / {:.0} | {} | {:.0} | {:.0} | {} / {} → {} / {} | {} | {} |",
            median(&key(reps, "resumed")),
            median(&key(reps, "storm_clients")),
            spread(&key(reps, "resume_all_secs"), num),
            total(reps, "missed"),
            total(reps, "duplicates"),
            lat("before", "p50_ms"),
            lat("before", "p99_ms"),
            lat("storm", "p50_ms"),
            lat("storm", "p99_ms"),
            num(median(&Run::values(reps, |r| f(
                &r["server_rss_mib"],
                "storm_peak"
            )))),
            reps.len()
        );
    }
    md
}

/// The goals the benchmarks are held to, each with its measured ratio.
fn goals(run: &Run) -> Option<String> {
    let get = |w: &str, sys: &str| -> Option<Vec<Value>> {
        run.of(w)
            .into_iter()
            .find(|(s, _)| *s == sys)
            .map(|(_, r)| r.to_vec())
    };
    let sustained = |sys: &str| get("fanout", sys).map(|r| median(&key(&r, "sustained_rate")));
    let ours = sustained("ours")?;
    let mut md = String::new();
    let _ = writeln!(md, "| goal | measured | met |");
    let _ = writeln!(md, "|---|---:|---|");
    let mut row = |goal: &str, measured: String, met: bool| {
        let _ = writeln!(
            md,
            "| {goal} | {measured} | {} |",
            if met { "yes" } else { "**no**" }
        );
    };
    for (peer, want, what) in [
        ("centrifugo", 1.5, "≥ 1.5× Centrifugo JSON"),
        ("centrifugo-pb", 1.0, "≥ 1.0× Centrifugo Protobuf"),
        ("raw", 0.7, "≥ 0.7× the raw upper bound"),
        ("socketio", 10.0, "≥ 10× Socket.IO (one core each)"),
    ] {
        match sustained(peer) {
            Some(p) if p > 0.0 => {
                let r = ours / p;
                row(
                    &format!("W1 sustained rate {what}"),
                    format!("{r:.2}× ({ours:.0} / {p:.0} msgs/s)"),
                    r >= want,
                );
            }
            Some(_) => row(
                &format!("W1 sustained rate {what}"),
                format!("{peer} sustained no step; ours {ours:.0} msgs/s"),
                ours > 0.0,
            ),
            None => {}
        }
    }
    // p99 at half of Centrifugo's sustained rate: the highest ladder step
    // at or below that half, where both were offered it.
    if let (Some(c), Some(o), Some(cr)) = (
        sustained("centrifugo"),
        get("fanout", "ours"),
        get("fanout", "centrifugo"),
    ) {
        let half = c / 2.0;
        let rate = o
            .iter()
            .chain(cr.iter())
            .flat_map(steps)
            .map(|s| f(&s, "rate"))
            .filter(|r| *r <= half)
            .fold(0.0f64, f64::max);
        if rate > 0.0 {
            let p99 = |reps: &[Value]| {
                median(
                    &reps
                        .iter()
                        .filter_map(|r| step_at(r, rate))
                        .map(|s| f(&s, "p99_ms"))
                        .collect::<Vec<_>>(),
                )
            };
            let (a, b) = (p99(&o), p99(&cr));
            row(
                &format!("W1 p99 at {rate:.0} msgs/s (≤ half of Centrifugo's sustained {c:.0}) ≤ Centrifugo's"),
                format!("{} ms vs {} ms", ms(a), ms(b)),
                a <= b,
            );
        }
    }
    let kib = |sys: &str| get("idle", sys).map(|r| median(&key(&r, "kib_per_connection")));
    if let (Some(a), Some(b)) = (kib("ours"), kib("centrifugo-tuned").filter(|b| *b > 0.0)) {
        let n = get("idle", "ours").map_or(0.0, |r| median(&key(&r, "connected")));
        row(
            &format!("W3 memory per idle connection ≤ 0.6× Centrifugo with tuned buffers (at {n:.0} connections)"),
            format!("{:.2}× ({a:.1} / {b:.1} KiB)", a / b),
            a / b <= 0.6,
        );
    }
    if let Some(reps) = get("storm", "ours") {
        let missed: f64 = total(&reps, "missed");
        let secs = key(&reps, "resume_all_secs")
            .into_iter()
            .fold(0.0f64, f64::max);
        let all = reps
            .iter()
            .all(|r| f(r, "resumed") >= f(r, "storm_clients") && f(r, "storm_clients") > 0.0);
        let n = median(&key(&reps, "storm_clients"));
        row(
            &format!(
                "W6: every reconnected client has every message, all resumed within 10 s (at {n:.0} clients in one room; the goal's size is 10,000)"
            ),
            format!("{missed:.0} missed, slowest run {secs:.1} s"),
            missed == 0.0 && all && secs <= 10.0,
        );
    }
    Some(md)
}

/// Writes DIR/results.md and the SVG charts from every JSON file under DIR.
pub fn write(dir: &str) -> Result<(), Error> {
    let run = Run::load(dir)?;
    let titles = [
        ("goals", "Goals"),
        ("w1-sustained", "W1 fan-out: sustained rate"),
        (
            "w1-ladder",
            "W1 fan-out: p50 / p99 / p99.9 ms per offered rate",
        ),
        ("w4-sustained", "W4 cross-node fan-out: sustained rate"),
        (
            "w4-ladder",
            "W4 cross-node fan-out: p50 / p99 / p99.9 ms per offered rate",
        ),
        ("w2", "W2 many rooms"),
        ("w3", "W3 idle connections"),
        ("w5", "W5 durable throughput"),
        ("w6", "W6 reconnect storm"),
    ];
    let mut md = String::new();
    // machine.txt for a run of every workload; machine-<workloads>.txt
    // for a later run of some of them, which replaced their files.
    let mut machines: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("machine") && n.ends_with(".txt"))
        .collect();
    machines.sort_by_key(|n| (n != "machine.txt", n.clone()));
    for name in machines {
        if let Ok(m) = std::fs::read_to_string(format!("{dir}/{name}")) {
            let _ = writeln!(md, "{name}:\n\n```text\n{m}```\n");
        }
    }
    let tables = tables(&run)?;
    for (name, title) in titles {
        if let Some((_, t)) = tables.iter().find(|(n, _)| n == name) {
            let _ = writeln!(md, "### {title}\n\n{t}");
        }
    }
    md.push_str("Medians over the runs, with min–max where runs differ; ladder cells: ✗ = not sustained (p99 > 100 ms, < 99.9% delivered, a drop, or the publisher fell behind), sat. = saturated.\n");
    std::fs::write(format!("{dir}/results.md"), &md)?;
    println!("{md}");
    Ok(())
}

/// Refreshes, in the document `doc`, every table between
/// `<!-- bench RESULTS TABLE -->` and `<!-- /bench -->` whose results
/// directory is `results` (as named in the marker, e.g. `full`), from `dir`.
pub fn doc(doc: &str, results: &str, dir: &str) -> Result<(), Error> {
    let text = std::fs::read_to_string(doc)?;
    let run = Run::load(dir)?;
    let tables = tables(&run)?;
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    let mut n = 0;
    while let Some(at) = rest.find("<!-- bench ") {
        let (before, from) = rest.split_at(at);
        out.push_str(before);
        let Some(end_marker) = from.find("-->") else {
            out.push_str(from);
            rest = "";
            break;
        };
        let marker = &from[..end_marker + 3];
        let mut words = marker["<!-- bench ".len()..end_marker].split_whitespace();
        let (Some(res), Some(name)) = (words.next(), words.next()) else {
            return Err(format!("{doc}: bad marker {marker}").into());
        };
        let body = &from[marker.len()..];
        let close = body
            .find("<!-- /bench -->")
            .ok_or_else(|| format!("{doc}: {marker} has no <!-- /bench -->"))?;
        out.push_str(marker);
        match tables.iter().find(|(t, _)| t == name) {
            Some((_, t)) if res == results => {
                out.push('\n');
                out.push_str(t);
                n += 1;
            }
            _ => out.push_str(&body[..close]),
        }
        out.push_str("<!-- /bench -->");
        rest = &body[close + "<!-- /bench -->".len()..];
    }
    out.push_str(rest);
    std::fs::write(doc, out)?;
    eprintln!("{doc}: {n} tables from {dir}");
    Ok(())
}
