//! An SVG of the run's distributions: the cumulative share of changes that reached every live
//! node within a time, and the same for failovers. Plain SVG text, no drawing library.

use std::fmt::Write as _;
use std::path::Path;

use crate::report::{pct, Outcome};

/// Why the plot could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {path}: {source}")]
pub struct PlotError {
    /// The file.
    pub path: String,
    /// Why.
    pub source: std::io::Error,
}

const W: f64 = 600.0;
const H: f64 = 420.0;
const M: f64 = 60.0;

/// Writes the convergence and failover distributions of `o` to `path`.
pub fn write_svg(path: &Path, o: &Outcome) -> Result<(), PlotError> {
    std::fs::write(path, svg(o)).map_err(|source| PlotError {
        path: path.display().to_string(),
        source,
    })
}

/// The SVG text.
pub fn svg(o: &Outcome) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{H}" font-family="sans-serif" font-size="12">"#,
        2.0 * W
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let title = format!("{} · seed {} · {} nodes", o.scenario, o.seed, o.nodes);
    panel(
        &mut s,
        0.0,
        &format!("{title}: change reaches every live node"),
        &o.spread_ms(),
    );
    panel(
        &mut s,
        W,
        &format!("{title}: owner crash to running elsewhere"),
        &o.failover_ms,
    );
    s.push_str("</svg>\n");
    s
}

fn panel(s: &mut String, x0: f64, title: &str, xs: &[f64]) {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let max = v.last().copied().unwrap_or(1.0).max(1.0) * 1.05;
    let (left, right, top, bottom) = (x0 + M, x0 + W - 20.0, 40.0, H - M);
    let px = |x: f64| left + (right - left) * x / max;
    let py = |y: f64| bottom - (bottom - top) * y;
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" font-size="14">{}</text>"#,
        x0 + 10.0,
        esc(title)
    );
    let _ = writeln!(
        s,
        r#"<path d="M{left},{top} L{left},{bottom} L{right},{bottom}" stroke="black" fill="none"/>"#
    );
    for i in 0..=5 {
        let f = f64::from(i) / 5.0;
        let (gx, gy) = (px(max * f), py(f));
        let _ = writeln!(
            s,
            r##"<line x1="{gx}" y1="{top}" x2="{gx}" y2="{bottom}" stroke="#ddd"/><text x="{gx}" y="{}" text-anchor="middle">{:.0}</text>"##,
            bottom + 16.0,
            max * f
        );
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{gy}" x2="{right}" y2="{gy}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{f:.1}</text>"##,
            left - 6.0,
            gy + 4.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">milliseconds (n = {})</text>"#,
        (left + right) / 2.0,
        H - 20.0,
        v.len()
    );
    if v.is_empty() {
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}">no samples</text>"#,
            px(max * 0.4),
            py(0.5)
        );
        return;
    }
    let n = v.len() as f64;
    let mut d = format!("M{},{}", px(v[0]), py(0.0));
    for (i, x) in v.iter().enumerate() {
        let _ = write!(
            d,
            " L{:.1},{:.1} L{:.1},{:.1}",
            px(*x),
            py(i as f64 / n),
            px(*x),
            py((i + 1) as f64 / n)
        );
    }
    let _ = writeln!(
        s,
        r#"<path d="{d}" stroke="steelblue" stroke-width="2" fill="none"/>"#
    );
    for (p, color, dy) in [(50.0, "green", 0.0), (99.0, "crimson", 16.0)] {
        if let Some(x) = pct(&v, p) {
            let _ = writeln!(
                s,
                r#"<line x1="{0}" y1="{top}" x2="{0}" y2="{bottom}" stroke="{color}"/><text x="{1}" y="{2}" fill="{color}">p{p:.0} = {x:.0} ms</text>"#,
                px(x),
                right - 150.0,
                bottom - 40.0 + dy
            );
        }
    }
}

fn esc(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
