//! Turns the JSON results of one run into Markdown tables and SVG charts.

use std::fmt::Write as _;

use serde_json::Value;

use crate::proto::Error;

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(0.0)
}

fn ratio(ours: f64, peer: f64) -> String {
    if peer > 0.0 {
        format!("{:.2}×", ours / peer)
    } else {
        "–".into()
    }
}

/// The step a fan-out result is judged at: the last one sustained, else the first.
fn judged(v: &Value) -> Value {
    let steps = v["steps"].as_array().cloned().unwrap_or_default();
    steps
        .iter()
        .rev()
        .find(|s| s["saturated"] == Value::Bool(false))
        .or(steps.first())
        .cloned()
        .unwrap_or(Value::Null)
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
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn is_ours(name: &str) -> bool {
    name.starts_with("ours")
}

/// Writes DIR/results.md and DIR/<workload>.svg from DIR/*.json.
pub fn write(dir: &str) -> Result<(), Error> {
    let mut all: Vec<Value> = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    names.sort();
    for p in names {
        all.push(serde_json::from_str(&std::fs::read_to_string(&p)?)?);
    }
    let mut md = String::new();
    let of =
        |w: &str| -> Vec<Value> { all.iter().filter(|v| v["workload"] == w).cloned().collect() };
    for (w, title) in [
        ("fanout", "W1 fan-out"),
        ("crossnode", "W4 cross-node fan-out"),
    ] {
        let rs = of(w);
        if rs.is_empty() {
            continue;
        }
        let _ = writeln!(md, "### {title}\n");
        let _ = writeln!(md, "| system | subscribers | max delivered msgs/s | highest sustained publish rate | p50 / p90 / p99 / p99.9 ms at that rate | server CPU % | server RSS MiB | connects/s | load avg |");
        let _ = writeln!(md, "|---|---:|---:|---:|---|---:|---:|---:|---|");
        for r in &rs {
            let s = judged(r);
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {:.0} | {:.1} / {:.1} / {:.1} / {:.1} | {:.0} | {:.0} | {:.0} | {} |",
                r["system"].as_str().unwrap_or(""),
                r["subscribers"],
                f(r, "max_delivered_per_sec"),
                f(r, "sustained_rate"),
                f(&s, "p50_ms"),
                f(&s, "p90_ms"),
                f(&s, "p99_ms"),
                f(&s, "p999_ms"),
                f(&s, "server_cpu_pct"),
                f(&s, "server_rss_mib"),
                f(r, "connect_per_sec"),
                r["load_average_start"].as_str().unwrap_or("")
            );
        }
        ratios(
            &mut md,
            &rs,
            "max_delivered_per_sec",
            "max delivered msgs/s",
        );
        // p99 per publish rate, every system side by side.
        let mut rates: Vec<f64> = rs
            .iter()
            .flat_map(|r| r["steps"].as_array().cloned().unwrap_or_default())
            .map(|s| f(&s, "rate"))
            .collect();
        rates.sort_by(|a, b| a.total_cmp(b));
        rates.dedup();
        let _ = write!(
            md,
            "\np99 latency (ms) and delivered msgs/s per publish rate (* = saturated):\n\n| rate |"
        );
        for r in &rs {
            let _ = write!(md, " {} |", r["system"].as_str().unwrap_or(""));
        }
        let _ = write!(md, "\n|---:|");
        for _ in &rs {
            md.push_str("---:|");
        }
        md.push('\n');
        for rate in &rates {
            let _ = write!(md, "| {rate:.0} |");
            for r in &rs {
                let step = r["steps"]
                    .as_array()
                    .and_then(|s| s.iter().find(|s| f(s, "rate") == *rate).cloned());
                match step {
                    Some(s) => {
                        let star = if s["saturated"] == Value::Bool(true) {
                            "*"
                        } else {
                            ""
                        };
                        let _ = write!(
                            md,
                            " {:.1} ms, {}{star} |",
                            f(&s, "p99_ms"),
                            human(f(&s, "delivered_per_sec"))
                        );
                    }
                    None => md.push_str(" |"),
                }
            }
            md.push('\n');
        }
        let series: Vec<(String, Vec<(f64, f64)>)> = rs
            .iter()
            .map(|r| {
                let pts = r["steps"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .map(|s| (f(s, "rate"), f(s, "delivered_per_sec")))
                    .collect();
                (r["system"].as_str().unwrap_or("").to_string(), pts)
            })
            .collect();
        std::fs::write(
            format!("{dir}/{w}.svg"),
            line_svg(
                title,
                "publish rate (msgs/s, log scale)",
                "delivered msgs/s",
                &series,
            ),
        )?;
        let _ = writeln!(md, "\n![{title}]({w}.svg)\n");
    }
    let rs = of("rooms");
    if !rs.is_empty() {
        let _ = writeln!(md, "### W2 many rooms\n");
        let _ = writeln!(md, "| system | connected / clients | rooms | delivered msgs/s | expected | p50 / p90 / p99 / p99.9 ms | errors | dropped | server CPU % | server RSS MiB | connects/s | load avg |");
        let _ = writeln!(
            md,
            "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|"
        );
        for r in &rs {
            let _ = writeln!(
                md,
                "| {} | {} / {} | {} | {:.0} | {:.0} | {:.1} / {:.1} / {:.1} / {:.1} | {} | {} | {:.0} | {:.0} | {:.0} | {} |",
                r["system"].as_str().unwrap_or(""),
                r["connected"], r["clients"], r["rooms"],
                f(r, "delivered_per_sec"), f(r, "expected_delivered_per_sec"),
                f(r, "p50_ms"), f(r, "p90_ms"), f(r, "p99_ms"), f(r, "p999_ms"),
                r["errors"], r["dropped"],
                f(r, "server_cpu_pct"), f(r, "server_rss_mib"), f(r, "connect_per_sec"),
                r["load_average_start"].as_str().unwrap_or("")
            );
        }
        ratios(
            &mut md,
            &rs,
            "p99_ms",
            "p99 latency (lower is better; ours ÷ peer)",
        );
        chart(
            &mut md,
            dir,
            &rs,
            "p99_ms",
            "rooms",
            ("W2 many rooms: p99 latency", "ms", "W2 p99"),
        )?;
    }
    let rs = of("idle");
    if !rs.is_empty() {
        let _ = writeln!(md, "### W3 idle connections\n");
        let _ = writeln!(md, "| system | connected / clients | connects/s | RSS before MiB | RSS after MiB | KiB per connection | load avg |");
        let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---|");
        for r in &rs {
            let _ = writeln!(
                md,
                "| {} | {} / {} | {:.0} | {:.1} | {:.1} | {:.1} | {} |",
                r["system"].as_str().unwrap_or(""),
                r["connected"],
                r["clients"],
                f(r, "connect_per_sec"),
                f(r, "rss_before_mib"),
                f(r, "rss_after_mib"),
                f(r, "kib_per_connection"),
                r["load_average_start"].as_str().unwrap_or("")
            );
        }
        ratios(
            &mut md,
            &rs,
            "kib_per_connection",
            "KiB per connection (lower is better; ours ÷ peer)",
        );
        chart(
            &mut md,
            dir,
            &rs,
            "kib_per_connection",
            "idle",
            ("W3 memory per idle connection", "KiB", "W3"),
        )?;
    }
    let rs = of("durable");
    if !rs.is_empty() {
        let _ = writeln!(md, "### W5 durable throughput\n");
        let _ = writeln!(md, "| system | clients × window | accepted (acked) msgs/s | acked total | stored by the workers | documents in MongoDB | lost | consumer lag at stop | lag after | drain s | load avg |");
        let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
        for r in &rs {
            let _ = writeln!(
                md,
                "| {} | {} × {} | {:.0} | {:.0} | {:.0} | {} | {:.0} | {:.0} | {:.0} | {:.1} | {} |",
                r["system"].as_str().unwrap_or(""),
                r["clients"],
                r["window"],
                f(r, "acked_per_sec"),
                f(r, "acked_total"),
                f(r, "stored_total"),
                r.get("mongo_documents")
                    .map_or_else(|| "not counted".to_string(), |n| n.to_string()),
                f(r, "lost"),
                f(r, "lag_at_stop"),
                f(r, "lag_after"),
                f(r, "drain_secs"),
                r["load_average_start"].as_str().unwrap_or("")
            );
        }
        chart(
            &mut md,
            dir,
            &rs,
            "acked_per_sec",
            "durable",
            ("W5 accepted msgs/s", "msgs/s", "W5"),
        )?;
    }
    std::fs::write(format!("{dir}/results.md"), &md)?;
    println!("{md}");
    Ok(())
}

/// "ours ÷ peer" for every pair of an ours row and a peer row.
/// A bar chart of `key` per system, written to `<dir>/<file>.svg` and
/// linked from the Markdown under the given title, unit and alt text.
fn chart(
    md: &mut String,
    dir: &str,
    rs: &[Value],
    key: &str,
    file: &str,
    (title, unit, alt): (&str, &str, &str),
) -> std::io::Result<()> {
    let bars: Vec<(String, f64)> = rs
        .iter()
        .map(|r| (r["system"].as_str().unwrap_or("").to_string(), f(r, key)))
        .collect();
    std::fs::write(format!("{dir}/{file}.svg"), bar_svg(title, unit, &bars))?;
    let _ = writeln!(md, "\n![{alt}]({file}.svg)\n");
    Ok(())
}

fn ratios(md: &mut String, rs: &[Value], key: &str, what: &str) {
    let ours: Vec<&Value> = rs
        .iter()
        .filter(|r| is_ours(r["system"].as_str().unwrap_or("")))
        .collect();
    let peers: Vec<&Value> = rs
        .iter()
        .filter(|r| !is_ours(r["system"].as_str().unwrap_or("")))
        .collect();
    if ours.is_empty() || peers.is_empty() {
        return;
    }
    let _ = writeln!(md, "\nRatio of ours to each peer, {what}:\n");
    for o in ours {
        let parts: Vec<String> = peers
            .iter()
            .map(|p| {
                let (a, b) = (
                    o[key].as_f64().unwrap_or(0.0),
                    p[key].as_f64().unwrap_or(0.0),
                );
                format!("{} {}", p["system"].as_str().unwrap_or(""), ratio(a, b))
            })
            .collect();
        let _ = writeln!(
            md,
            "- {}: {}",
            o["system"].as_str().unwrap_or(""),
            parts.join(", ")
        );
    }
}
