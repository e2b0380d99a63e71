//! The review page's HTML and the score-history SVG, rendered on the server: plain
//! markup that `assets/app.js` brings to life (pushed updates, buttons, shortcuts). Every
//! value from outside (part ids, model names, event payloads) is escaped here.

use std::fmt::Write;

use html_escape::{encode_double_quoted_attribute as attr, encode_text as text};

use super::board::{Bucket, Verdict};
use super::review::{Alert, LabelFilter};
use crate::capture::labels::Verdict as Label;

/// What the live page shows of one camera.
pub struct Tile {
    pub camera: String,
    pub status: &'static str,
    pub enabled: bool,
    pub sensitivity: f64,
    pub fps: f64,
    pub last: Option<Verdict>,
}

/// The frame every page shares: title, navigation and the write-token field.
fn layout(node: &str, page: &str, title: &str, main: &str) -> String {
    let (node, title) = (text(node), text(title));
    let nav = [("live", "/", "Live"), ("review", "/review", "Review"), ("history", "/history", "Score history")]
        .iter()
        .map(|(key, href, name)| {
            let current = if *key == page { r#" aria-current="page""# } else { "" };
            format!(r#"<a href="{href}"{current}>{name}</a>"#)
        })
        .collect::<String>();
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · {node} · edge-inspect</title>
<link rel="stylesheet" href="/assets/app.css"><script src="/assets/app.js" defer></script>
</head><body data-page="{page}">
<header><strong>edge-inspect</strong> <span class="node">{node}</span><nav>{nav}</nav>
<form id="token-form"><input id="token" type="password" autocomplete="off" placeholder="write token">
<button type="submit">Save token</button></form></header>
<p id="message" role="status"></p>
<main>{main}</main></body></html>
"#
    )
}

fn verdict_text(last: Option<&Verdict>) -> String {
    match last {
        Some(v) => format!(
            "{} · score {:.3}{}",
            if v.anomalous { "ANOMALY" } else { "normal" },
            v.normalised_score,
            v.part_id.as_deref().map(|p| format!(" · part {}", text(p))).unwrap_or_default()
        ),
        None => "no frame yet".into(),
    }
}

/// `/`: one tile per camera with its latest overlay and controls, and the model swap.
pub fn live(node: &str, tiles: &[Tile], bundles: &[String], model: &str) -> String {
    let mut main = String::from(r#"<section class="tiles">"#);
    for t in tiles {
        let cam = attr(&t.camera);
        let seq = t.last.as_ref().map_or(0, |v| v.picture_seq);
        let picture = if t.last.is_some() {
            format!(
                r#"<img class="live" data-field="picture" src="/live/{cam}.jpg?seq={seq}" alt="latest frame of {cam}">"#
            )
        } else {
            r#"<img class="live" data-field="picture" alt="no frame yet">"#.to_string()
        };
        let (toggle, toggle_label) = if t.enabled { ("OFF", "Disable") } else { ("ON", "Enable") };
        let _ = write!(
            main,
            r#"<article class="tile" id="tile-{cam}" data-camera="{cam}">
<h2>{name} <span class="status status-{status}" data-field="status">{status}</span></h2>{picture}
<dl><dt>Verdict</dt><dd data-field="verdict">{verdict}</dd>
<dt>Frame</dt><dd data-field="seq">{seq}</dd><dt>Model</dt><dd data-field="model">{model}</dd>
<dt>fps</dt><dd data-field="fps">{fps:.1}</dd><dt>Sensitivity</dt><dd data-field="sensitivity">{sens}</dd></dl>
<div class="controls"><button data-command="enabled" data-payload="{toggle}">{toggle_label}</button>
<label>Sensitivity <input type="number" class="sensitivity" min="0.1" max="10" step="0.1" value="{sens}"></label>
<button data-command="sensitivity">Set</button><button data-command="snapshot" data-payload="">Snapshot</button></div>
</article>"#,
            name = text(&t.camera),
            status = t.status,
            verdict = verdict_text(t.last.as_ref()),
            model = text(t.last.as_ref().map_or(model, |v| v.model.as_str())),
            fps = t.fps,
            sens = t.sensitivity,
        );
    }
    main.push_str("</section>");
    let options: String =
        bundles.iter().map(|b| format!(r#"<option value="{0}">{1}</option>"#, attr(b), text(b))).collect();
    let _ = write!(
        main,
        r#"<section class="models"><h2>Model</h2><p>Running: <span id="model-name">{}</span></p>
<label>Bundle <select id="model-select">{options}</select></label> <button id="model-swap">Swap model</button></section>"#,
        text(model)
    );
    layout(node, "live", "Live", &main)
}

fn label_text(label: Option<Label>) -> &'static str {
    match label {
        Some(Label::Defect) => "defect",
        Some(Label::Normal) => "not a defect",
        None => "unlabelled",
    }
}

/// The filter form of the review page.
fn review_filter(cameras: &[String], camera: Option<&str>, filter: LabelFilter) -> String {
    let mut form = String::from(
        r#"<form class="filter" method="get" action="/review"><label>Camera <select name="camera"><option value="">all</option>"#,
    );
    for c in cameras {
        let selected = if Some(c.as_str()) == camera { " selected" } else { "" };
        let _ = write!(form, r#"<option value="{0}"{selected}>{1}</option>"#, attr(c), text(c));
    }
    form.push_str(r#"</select></label> <label>Label <select name="label">"#);
    for (f, name) in LabelFilter::ALL {
        let selected = if f == filter { " selected" } else { "" };
        let _ = write!(form, r#"<option value="{name}"{selected}>{name}</option>"#);
    }
    form.push_str(r#"</select></label> <button type="submit">Show</button></form>"#);
    form
}

fn alert_item(a: &Alert) -> String {
    let (cam, id) = (attr(&a.camera), attr(&a.id));
    let part = a.part_id.as_deref().map(|p| format!("<dt>Part</dt><dd>{}</dd>", text(p))).unwrap_or_default();
    format!(
        r#"<li class="alert" tabindex="0" id="alert-{cam}-{seq}" data-camera="{cam}" data-seq="{seq}">
<div class="images"><figure><img src="/store/{cam}/{id}/overlay.png" alt="overlay"><figcaption>overlay</figcaption></figure>
<figure><img src="/store/{cam}/{id}/frame.png" alt="frame"><figcaption>frame</figcaption></figure>
<figure><img src="/store/{cam}/{id}/mask.png" alt="mask"><figcaption>mask</figcaption></figure></div>
<dl><dt>Camera</dt><dd>{camera}</dd><dt>Frame</dt><dd>{seq}</dd><dt>Captured</dt><dd>{at}</dd>
<dt>Score</dt><dd>{score:.3} (threshold 0.5)</dd><dt>Regions</dt><dd>{regions}</dd><dt>Model</dt><dd>{model}</dd>{part}
<dt>Label</dt><dd class="label-state" data-field="label">{label}</dd></dl>
<div class="controls"><button class="defect" data-verdict="defect">Defect <kbd>d</kbd></button>
<button class="normal" data-verdict="normal">Not a defect <kbd>n</kbd></button></div></li>"#,
        seq = a.seq,
        camera = text(&a.camera),
        at = text(&a.captured_at),
        score = a.normalised_score,
        regions = a.regions,
        model = text(&a.model),
        label = label_text(a.label),
    )
}

fn events_table(events: &[serde_json::Value]) -> String {
    let mut table = String::from(
        "<table class=\"events\"><thead><tr><th>Event</th><th>Camera</th><th>State</th><th>Start</th><th>Frames</th><th>Peak</th><th>Best frame</th></tr></thead><tbody>",
    );
    for e in events {
        let field =
            |k: &str| e.get(k).map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string)).unwrap_or_default();
        let (camera, best) = (field("camera"), field("best_seq"));
        let peak = e.get("peak_normalised_score").and_then(|v| v.as_f64()).unwrap_or_default();
        let _ = write!(
            table,
            r##"<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{peak:.3}</td><td><a href="#alert-{}-{}">{}</a></td></tr>"##,
            text(&field("id")),
            text(&camera),
            text(&field("type")),
            text(&field("start_time")),
            text(&field("frames")),
            attr(&camera),
            attr(&best),
            text(&best),
        );
    }
    table.push_str("</tbody></table>");
    table
}

/// `/review`: the filter, the defect events and the flagged frames with their labels.
pub fn review(
    node: &str,
    cameras: &[String],
    (camera, filter): (Option<&str>, LabelFilter),
    events: &[serde_json::Value],
    alerts: Option<&[Alert]>,
) -> String {
    let mut main = review_filter(cameras, camera, filter);
    main.push_str("<h2>Defect events</h2>");
    main.push_str(&events_table(events));
    main.push_str(r#"<h2>Flagged frames</h2><p class="help">Keys: <kbd>j</kbd>/<kbd>k</kbd> next/previous, <kbd>d</kbd> defect, <kbd>n</kbd> not a defect.</p>"#);
    match alerts {
        None => main.push_str("<p>Recording is off ([recorder] enabled = false): there are no frames to review.</p>"),
        Some([]) => main.push_str(r#"<p class="empty">No flagged frames in the review window.</p>"#),
        Some(alerts) => {
            main.push_str(r#"<ol class="queue">"#);
            alerts.iter().for_each(|a| main.push_str(&alert_item(a)));
            main.push_str("</ol>");
        }
    }
    layout(node, "review", "Review", &main)
}

/// `/history`: each camera's score plot and alert counts.
pub fn history(node: &str, cameras: &[(String, f64, [u32; 2])], minutes: u64) -> String {
    let mut main = format!(
        r#"<p>The last {minutes} minutes: the highest score of each second, the threshold (0.5 at the camera's sensitivity) and the alerts, in 60 bins of the window.</p>"#
    );
    for (camera, sensitivity, [recent, total]) in cameras {
        let _ = write!(
            main,
            r#"<section class="history"><h2>{name}</h2><p>Sensitivity {sensitivity} · alerts: {recent} in the last 10 minutes, {total} in the window</p>
<img src="/history/{cam}.svg?minutes={minutes}" alt="score history of {cam}"></section>"#,
            name = text(camera),
            cam = attr(camera),
        );
    }
    layout(node, "history", "Score history", &main)
}

/// The score plot of `buckets` over the `seconds` up to `now` (Unix seconds): the peak
/// score of each second against the threshold, and the alerts in 60 bins of the window.
pub fn history_svg(buckets: &[Bucket], now: u64, seconds: u64) -> String {
    const W: f64 = 800.0;
    const H: f64 = 200.0;
    const TOP: f64 = 8.0;
    const BARS: f64 = 40.0;
    let start = now.saturating_sub(seconds);
    let x = |second: u64| (second.saturating_sub(start) as f64 / seconds as f64) * W;
    let y = |score: f64| TOP + (H - BARS - TOP) * (1.0 - score.clamp(0.0, 1.0));
    let buckets: Vec<&Bucket> = buckets.iter().filter(|b| b.second >= start).collect();
    let points: String = buckets.iter().map(|b| format!("{:.1},{:.1} ", x(b.second), y(b.peak))).collect();
    let bin = (seconds / 60).max(1);
    let mut per_bin: std::collections::BTreeMap<u64, u32> = std::collections::BTreeMap::new();
    for b in buckets.iter().filter(|b| b.alerts > 0) {
        *per_bin.entry((b.second - start) / bin).or_default() += b.alerts;
    }
    let most = per_bin.values().copied().max().unwrap_or(1).max(1);
    let bar_width = W * bin as f64 / seconds as f64;
    let bars: String = per_bin
        .iter()
        .map(|(i, n)| {
            let h = BARS * f64::from(*n) / f64::from(most);
            format!(
                r##"<rect class="alerts" x="{:.1}" y="{:.1}" width="{bar_width:.1}" height="{h:.1}" fill="#d33"/>"##,
                x(start + i * bin),
                H - h
            )
        })
        .collect();
    let threshold = y(0.5);
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" font-family="sans-serif" font-size="11">
<rect width="{W}" height="{H}" fill="#fff" stroke="#ccc"/>
<line x1="0" x2="{W}" y1="{threshold:.1}" y2="{threshold:.1}" stroke="#d33" stroke-dasharray="6 4"/>
<text x="4" y="{label:.1}" fill="#d33">threshold</text>
<polyline class="scores" points="{points}" fill="none" stroke="#246" stroke-width="1.5"/>
<circle cx="{last_x:.1}" cy="{last_y:.1}" r="3" fill="#246"/>{bars}
<text x="4" y="{bottom:.1}" fill="#555">alerts per {bin} s (max {most})</text></svg>"##,
        label = threshold - 4.0,
        bottom = H - BARS - 4.0,
        last_x = buckets.last().map_or(-10.0, |b| x(b.second)),
        last_y = buckets.last().map_or(-10.0, |b| y(b.peak)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_history_plot_places_scores_and_alert_bins_inside_the_window() {
        let now = 10_000;
        let buckets = [
            Bucket { second: now - 7200, peak: 0.9, frames: 1, alerts: 1 },
            Bucket { second: now - 59, peak: 0.2, frames: 2, alerts: 0 },
            Bucket { second: now - 30, peak: 0.75, frames: 2, alerts: 2 },
            Bucket { second: now, peak: 1.4, frames: 1, alerts: 1 },
        ];
        let svg = history_svg(&buckets, now, 60);
        // One bin per second: a bar at 30 s of 60 (x = 400) two alerts high, one at the end.
        assert!(svg.contains(r#"<rect class="alerts" x="400.0" y="160.0" width="13.3" height="40.0""#), "{svg}");
        assert!(svg.contains(r#"x="800.0" y="180.0""#), "{svg}");
        assert_eq!(svg.matches(r#"class="alerts""#).count(), 2, "the alert before the window is not drawn: {svg}");
        // Scores clamp to the plot: 1.4 is drawn at the top (y = 8).
        assert!(svg.contains("800.0,8.0"), "{svg}");
        assert!(svg.contains("alerts per 1 s (max 2)"), "{svg}");
    }
}
