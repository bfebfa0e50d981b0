//! The demo's picture of its run, drawn from the dashboard's own series: the validation
//! loss by round (`starling_operator_run_validation_loss`, as the run's status keeps it)
//! and each peer's mean round time by phase (`starling_trainer_round_phase_seconds`). An
//! SVG, so it needs no fonts or image libraries and reads well in a README.

use std::fmt::Write;

use starling_trainer::roles::metrics::Phase;

/// What the picture shows.
pub struct RunPicture<'a> {
    pub title: &'a str,
    /// (round, validation loss), oldest first.
    pub loss: &'a [(u32, f64)],
    /// Each peer's mean seconds per round in each phase, in [`Phase::ALL`] order.
    pub phases: &'a [(String, [f64; 6])],
}

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 380.0;
/// The plotting area of each panel: left, top, width, height.
const LOSS_AREA: (f64, f64, f64, f64) = (70.0, 60.0, 360.0, 250.0);
const PHASE_AREA: (f64, f64, f64, f64) = (560.0, 60.0, 360.0, 250.0);
const COLOURS: [&str; 6] = [
    "#4e79a7", "#f28e2b", "#e15759", "#bab0ac", "#59a14f", "#b07aa1",
];

impl RunPicture<'_> {
    pub fn svg(&self) -> String {
        let mut out = String::new();
        let _ = write!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="24" font-size="16" text-anchor="middle">{}</text>
"#,
            WIDTH / 2.0,
            escape(self.title)
        );
        self.loss_panel(&mut out);
        self.phase_panel(&mut out);
        out.push_str("</svg>\n");
        out
    }

    fn loss_panel(&self, out: &mut String) {
        let (x0, y0, w, h) = LOSS_AREA;
        title(out, LOSS_AREA, "Validation loss by round");
        let Some((&(first, _), &(last, _))) = self.loss.first().zip(self.loss.last()) else {
            return;
        };
        let (lo, hi) = bounds(self.loss.iter().map(|(_, l)| *l));
        let span = f64::from((last - first).max(1));
        let x = |r: u32| x0 + w * f64::from(r - first) / span;
        let y = |l: f64| y0 + h * (1.0 - (l - lo) / (hi - lo));
        axes(out, LOSS_AREA);
        for i in 0..=4 {
            let v = lo + (hi - lo) * f64::from(i) / 4.0;
            tick_y(out, x0, y(v), &format!("{v:.2}"));
        }
        for r in ticks(first, last) {
            tick_x(out, x(r), y0 + h, &r.to_string());
        }
        label(out, x0 + w / 2.0, y0 + h + 34.0, "round");
        let points: Vec<String> = (self.loss.iter())
            .map(|&(r, l)| format!("{:.1},{:.1}", x(r), y(l)))
            .collect();
        let _ = writeln!(
            out,
            r##"<polyline points="{}" fill="none" stroke="#4e79a7" stroke-width="2"/>"##,
            points.join(" ")
        );
        for p in &points {
            let (px, py) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(
                out,
                r##"<circle cx="{px}" cy="{py}" r="2.5" fill="#4e79a7"/>"##
            );
        }
    }

    fn phase_panel(&self, out: &mut String) {
        let (x0, y0, w, h) = PHASE_AREA;
        title(out, PHASE_AREA, "Seconds per round by phase");
        let peers = self.phases.len();
        if peers == 0 {
            return;
        }
        let most = (self.phases.iter())
            .map(|(_, p)| p.iter().sum::<f64>())
            .fold(0.0, f64::max)
            .max(1e-3);
        let scale = w / most;
        let band = h / peers as f64;
        axes(out, PHASE_AREA);
        for i in 0..=4 {
            let v = most * f64::from(i) / 4.0;
            tick_x(out, x0 + v * scale, y0 + h, &format!("{v:.1}"));
        }
        label(out, x0 + w / 2.0, y0 + h + 34.0, "seconds (mean per round)");
        for (i, (peer, phases)) in self.phases.iter().enumerate() {
            let top = y0 + band * i as f64 + band * 0.2;
            tick_y(out, x0, top + band * 0.3, peer);
            let mut left = x0;
            for (seconds, colour) in phases.iter().zip(COLOURS) {
                let _ = writeln!(
                    out,
                    r#"<rect x="{left:.1}" y="{top:.1}" width="{:.1}" height="{:.1}" fill="{colour}"/>"#,
                    seconds * scale,
                    band * 0.6
                );
                left += seconds * scale;
            }
        }
        for (i, (phase, colour)) in Phase::ALL.iter().zip(COLOURS).enumerate() {
            let lx = x0 + (i % 3) as f64 * 120.0;
            let ly = y0 + h + 52.0 + (i / 3) as f64 * 16.0;
            let _ = writeln!(
                out,
                r#"<rect x="{lx}" y="{}" width="10" height="10" fill="{colour}"/><text x="{}" y="{}">{}</text>"#,
                ly - 9.0,
                lx + 14.0,
                ly,
                phase.name()
            );
        }
    }
}

/// The range a series is drawn over, a little wider than its values.
fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-3);
    (lo - pad, hi + pad)
}

/// At most about six round numbers between `first` and `last`, both included.
fn ticks(first: u32, last: u32) -> Vec<u32> {
    let step = ((last - first) / 5).max(1);
    let mut t: Vec<u32> = (first..=last).step_by(step as usize).collect();
    if t.last() != Some(&last) {
        t.push(last);
    }
    t
}

fn title(out: &mut String, (x0, y0, w, _): (f64, f64, f64, f64), text: &str) {
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" font-size="14" text-anchor="middle">{text}</text>"#,
        x0 + w / 2.0,
        y0 - 12.0
    );
}

fn axes(out: &mut String, (x0, y0, w, h): (f64, f64, f64, f64)) {
    let _ = writeln!(
        out,
        r##"<path d="M{x0},{y0} V{} H{}" fill="none" stroke="#333"/>"##,
        y0 + h,
        x0 + w
    );
}

fn tick_x(out: &mut String, x: f64, y: f64, text: &str) {
    let _ = writeln!(
        out,
        r##"<line x1="{x:.1}" y1="{y}" x2="{x:.1}" y2="{}" stroke="#333"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
        y + 4.0,
        y + 17.0,
        escape(text)
    );
}

fn tick_y(out: &mut String, x: f64, y: f64, text: &str) {
    let _ = writeln!(
        out,
        r##"<line x1="{}" y1="{y:.1}" x2="{x}" y2="{y:.1}" stroke="#333"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
        x - 4.0,
        x - 7.0,
        y + 4.0,
        escape(text)
    );
}

fn label(out: &mut String, x: f64, y: f64, text: &str) {
    let _ = writeln!(
        out,
        r#"<text x="{x}" y="{y}" text-anchor="middle">{}</text>"#,
        escape(text)
    );
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_picture_draws_every_round_and_every_phase_of_every_peer() {
        let loss = [(1, 5.0), (2, 4.0), (3, 3.5)];
        let phases = [
            ("p0".to_string(), [2.0, 0.1, 0.2, 1.0, 0.1, 0.05]),
            ("p1".to_string(), [2.5, 0.1, 0.3, 0.4, 0.1, 0.05]),
        ];
        let svg = RunPicture {
            title: "demo <run>",
            loss: &loss,
            phases: &phases,
        }
        .svg();
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("demo &lt;run&gt;"), "{svg}");
        assert_eq!(svg.matches("<circle").count(), 3);
        // 6 phases for each of 2 peers, and 6 legend boxes.
        assert_eq!(svg.matches("<rect x=").count(), 2 * 6 + 6);
        for phase in Phase::ALL {
            assert!(svg.contains(phase.name()), "{svg}");
        }
    }

    #[test]
    fn an_empty_run_still_draws_both_titles() {
        let svg = RunPicture {
            title: "t",
            loss: &[],
            phases: &[],
        }
        .svg();
        assert!(svg.contains("Validation loss by round"));
        assert!(svg.contains("Seconds per round by phase"));
    }

    #[test]
    fn round_ticks_include_both_ends() {
        assert_eq!(ticks(1, 12), vec![1, 3, 5, 7, 9, 11, 12]);
        assert_eq!(ticks(4, 4), vec![4]);
    }
}
