//! A hand-written SVG: rate per second over time, and the latency
//! distribution (latency against percentile, log-scaled toward the tail).

use std::fmt::Write as _;

use crate::report::{Latency, Report};

const W: f64 = 800.0;
const PANEL_H: f64 = 260.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A "nice" upper bound for an axis.
fn nice_max(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if v <= m * mag {
            return m * mag;
        }
    }
    10.0 * mag
}

fn axes(o: &mut String, top: f64, title: &str, xlabel: &str, ylabel: &str) {
    let bottom = top + PANEL_H - 40.0;
    let _ = writeln!(
        o,
        r#"<text x="{}" y="{}" font-size="14" font-weight="bold">{}</text>"#,
        LEFT,
        top - 8.0,
        esc(title)
    );
    let _ = writeln!(
        o,
        r#"<line x1="{LEFT}" y1="{top}" x2="{LEFT}" y2="{bottom}" stroke="black"/><line x1="{LEFT}" y1="{bottom}" x2="{}" y2="{bottom}" stroke="black"/>"#,
        W - RIGHT
    );
    let _ = writeln!(
        o,
        r#"<text x="{}" y="{}" font-size="11" text-anchor="middle">{}</text>"#,
        (LEFT + W - RIGHT) / 2.0,
        bottom + 32.0,
        esc(xlabel)
    );
    let _ = writeln!(
        o,
        r#"<text x="14" y="{}" font-size="11" transform="rotate(-90 14 {})" text-anchor="middle">{}</text>"#,
        (top + bottom) / 2.0,
        (top + bottom) / 2.0,
        esc(ylabel)
    );
}

fn rate_panel(o: &mut String, top: f64, series: &[u64], what: &str) {
    let bottom = top + PANEL_H - 40.0;
    axes(
        o,
        top,
        &format!("{what} per second"),
        "seconds since start",
        &format!("{what}/s"),
    );
    let n = series.len().max(2) as f64;
    let ymax = nice_max(series.iter().copied().max().unwrap_or(0) as f64);
    let x = |i: f64| LEFT + (W - LEFT - RIGHT) * i / (n - 1.0).max(1.0);
    let y = |v: f64| bottom - (bottom - top) * v / ymax;
    for k in 0..=4 {
        let v = ymax * f64::from(k) / 4.0;
        let _ = writeln!(
            o,
            r#"<text x="{}" y="{}" font-size="10" text-anchor="end">{}</text><line x1="{LEFT}" y1="{yy}" x2="{}" y2="{yy}" stroke="lightgray"/>"#,
            LEFT - 4.0,
            y(v) + 3.0,
            v.round(),
            W - RIGHT,
            yy = y(v)
        );
    }
    for k in 0..=4 {
        let i = (n - 1.0) * f64::from(k) / 4.0;
        let _ = writeln!(
            o,
            r#"<text x="{}" y="{}" font-size="10" text-anchor="middle">{}</text>"#,
            x(i),
            bottom + 14.0,
            i.round()
        );
    }
    // Each point is the count of the second that ends there.
    let pts: Vec<String> = series
        .iter()
        .enumerate()
        .map(|(i, &v)| format!("{:.1},{:.1}", x(i as f64), y(v as f64)))
        .collect();
    let _ = writeln!(
        o,
        r#"<polyline fill="none" stroke="steelblue" stroke-width="2" points="{}"/>"#,
        pts.join(" ")
    );
}

fn latency_panel(o: &mut String, top: f64, lat: &Latency, name: &str) {
    let bottom = top + PANEL_H - 40.0;
    axes(
        o,
        top,
        &format!("{name} latency distribution ({} samples)", lat.count),
        "percentile",
        "latency (ms)",
    );
    // x: log10(1 / (1 − p)), 0 (p0) … 5 (p99.999).
    let xmax = 5.0;
    let x = |p: f64| {
        let q = (1.0 - p / 100.0).max(1e-5);
        LEFT + (W - LEFT - RIGHT) * ((1.0 / q).log10() / xmax).min(1.0)
    };
    let ymax = nice_max(lat.max_us as f64 / 1000.0);
    let y = |ms: f64| bottom - (bottom - top) * ms / ymax;
    for (p, label) in [
        (0.0, "0"),
        (90.0, "90"),
        (99.0, "99"),
        (99.9, "99.9"),
        (99.99, "99.99"),
        (99.999, "99.999"),
    ] {
        let _ = writeln!(
            o,
            r#"<text x="{}" y="{}" font-size="10" text-anchor="middle">{label}</text><line x1="{xx}" y1="{top}" x2="{xx}" y2="{bottom}" stroke="lightgray"/>"#,
            x(p),
            bottom + 14.0,
            xx = x(p)
        );
    }
    for k in 0..=4 {
        let v = ymax * f64::from(k) / 4.0;
        let _ = writeln!(
            o,
            r#"<text x="{}" y="{}" font-size="10" text-anchor="end">{}</text>"#,
            LEFT - 4.0,
            y(v) + 3.0,
            (v * 100.0).round() / 100.0
        );
    }
    let pts: Vec<String> = lat
        .curve
        .iter()
        .map(|&(p, us)| format!("{:.1},{:.1}", x(p), y(us as f64 / 1000.0)))
        .collect();
    let _ = writeln!(
        o,
        r#"<polyline fill="none" stroke="firebrick" stroke-width="2" points="{}"/>"#,
        pts.join(" ")
    );
}

/// The whole picture.
pub fn svg(r: &Report) -> String {
    let mut o = String::new();
    let h = 2.0 * PANEL_H + 60.0;
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" font-family="sans-serif">"#
    );
    let _ = writeln!(o, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="{LEFT}" y="16" font-size="12">{}</text>"#,
        esc(&format!(
            "loadgen {} → {} ({} workers, kernel {})",
            r.mode, r.broker, r.workers, r.kernel
        ))
    );
    let (what, lname) = match r.mode.as_str() {
        "churn" => ("cycles", "cycle"),
        "pubsub" => ("deliveries", "e2e"),
        _ => ("connects", "connack"),
    };
    rate_panel(&mut o, 50.0, &r.series, what);
    if let Some(l) = r.latency.get(lname) {
        latency_panel(&mut o, 50.0 + PANEL_H + 10.0, l, lname);
    }
    o.push_str("</svg>\n");
    o
}

#[cfg(test)]
mod tests {
    use super::nice_max;

    #[test]
    fn nice_axis_bounds() {
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(7.0), 10.0);
        assert_eq!(nice_max(1500.0), 2000.0);
        assert_eq!(nice_max(40_000.0), 50_000.0);
    }
}
