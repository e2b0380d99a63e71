//! The review page for the line, served by the daemon's own HTTP endpoint (`daemon::http`
//! owns the connections; this module owns what the page's paths answer):
//! - `/` live: a tile per camera with the latest overlay, status, fps, verdict and the
//!   controls, updated by pushed verdicts (`/api/stream`, server-sent events);
//! - `/review`: the defect events and the flagged frames of the review window with their
//!   images and labels, filterable by camera and label, with Defect / Not a defect buttons;
//! - `/history`: per camera the score plot against the threshold and the alert rate.
//!
//! Reading is open to whoever reaches the port (loopback by default). Every write —
//! labels, enable, sensitivity, snapshot, model swap — is a `POST /api/…` carried out by
//! the same [`Control::execute`] as the MQTT command it mirrors, and needs the configured
//! token in the `X-Edge-Inspect-Token` header: without a token the page is read-only. A
//! header a cross-site form cannot set makes the writes CSRF-safe; a request whose
//! `Origin` is not the page's own or that the browser marks cross-site is refused too.

pub mod board;
mod pages;
pub mod review;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::{HeaderMap, Method};
use subtle::ConstantTimeEq;

use super::cameras::Cameras;
use super::models::CurrentModel;
use super::mqtt::control::Control;
use board::Board;
use review::LabelFilter;

/// The header that carries the write token.
pub const TOKEN_HEADER: &str = "x-edge-inspect-token";
/// The longest window the history page plots (minutes): the history's length.
const MAX_HISTORY_MINUTES: u64 = (board::HISTORY_SECONDS / 60) as u64;

/// What the page reads and acts on.
pub struct Site {
    pub node: String,
    pub board: Arc<Board>,
    pub control: Arc<Control>,
    pub cameras: Cameras,
    /// The capture store (flagged frames), if recording is on.
    pub store: Option<PathBuf>,
    /// Bundles the model swap may name.
    pub models_dir: PathBuf,
    pub model: CurrentModel,
    /// The write token; `None`: read-only.
    pub token: Option<String>,
    pub review_window: Duration,
}

/// One request as the page sees it.
pub struct Request<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
}

/// What the page answers.
pub enum Reply {
    Body {
        status: u16,
        content_type: &'static str,
        body: Vec<u8>,
    },
    /// The push channel, as server-sent events.
    Stream(tokio::sync::broadcast::Receiver<String>),
}

fn reply(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Reply {
    Reply::Body { status, content_type, body: body.into() }
}

const HTML: &str = "text/html; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

fn query_value(query: Option<&str>, key: &str) -> Option<String> {
    form_urlencoded::parse(query.unwrap_or_default().as_bytes()).find(|(k, _)| k == key).map(|(_, v)| v.into_owned())
}

impl Site {
    /// The answer to `request`, or `None` where the path is not the page's.
    pub fn handle(&self, request: &Request) -> Option<Reply> {
        if request.method == Method::POST {
            return request.path.strip_prefix("/api/").map(|command| self.write(request, command));
        }
        if request.method != Method::GET && request.method != Method::HEAD {
            return None;
        }
        let path = request.path;
        Some(match path {
            "/" => reply(200, HTML, self.live_page()),
            "/review" => self.review_page(request.query),
            "/history" => self.history_page(request.query),
            "/assets/app.js" => reply(200, "text/javascript; charset=utf-8", include_str!("assets/app.js")),
            "/assets/app.css" => reply(200, "text/css; charset=utf-8", include_str!("assets/app.css")),
            "/api/state" => reply(200, "application/json", serde_json::to_vec(&self.state()).expect("serialises")),
            "/api/stream" => Reply::Stream(self.board.listen()),
            _ => return self.files(path, request.query),
        })
    }

    /// `/live/<camera>.jpg`, `/history/<camera>.svg`, `/store/<camera>/<id>/<file>`.
    fn files(&self, path: &str, query: Option<&str>) -> Option<Reply> {
        let not_found = || reply(404, TEXT, format!("not found: {path}\n"));
        if let Some(camera) = path.strip_prefix("/live/").and_then(|p| p.strip_suffix(".jpg")) {
            return Some(match self.board.picture(camera) {
                Some((_, _, jpeg)) => reply(200, "image/jpeg", jpeg),
                None => not_found(),
            });
        }
        if let Some(camera) = path.strip_prefix("/history/").and_then(|p| p.strip_suffix(".svg")) {
            if self.cameras.find(camera).is_none() {
                return Some(not_found());
            }
            let seconds = self.minutes(query) * 60;
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
            let svg = pages::history_svg(&self.board.history(camera, seconds), now, seconds);
            return Some(reply(200, "image/svg+xml", svg));
        }
        let rest = path.strip_prefix("/store/")?;
        let parts: Vec<&str> = rest.split('/').collect();
        let (Some(store), [camera, id, file]) = (&self.store, parts.as_slice()) else {
            return Some(not_found());
        };
        let (camera, id, file) = (*camera, *id, *file);
        let cameras = self.camera_ids();
        let body = if file == "overlay.png" {
            review::overlay(store, &cameras, camera, id)
        } else {
            review::image(store, &cameras, camera, id, file)
        };
        Some(body.map_or_else(not_found, |png| reply(200, "image/png", png)))
    }

    fn camera_ids(&self) -> Vec<String> {
        self.cameras.active().into_iter().map(|(_, c)| c.id.clone()).collect()
    }

    fn minutes(&self, query: Option<&str>) -> u64 {
        query_value(query, "minutes").and_then(|m| m.parse().ok()).unwrap_or(60).clamp(1, MAX_HISTORY_MINUTES)
    }

    fn tiles(&self) -> Vec<pages::Tile> {
        self.cameras
            .active()
            .into_iter()
            .map(|(_, c)| pages::Tile {
                camera: c.id.clone(),
                status: c.stats.status().as_str(),
                enabled: c.controls.enabled(),
                sensitivity: c.controls.sensitivity(),
                fps: self.board.fps(&c.id),
                last: self.board.last(&c.id),
            })
            .collect()
    }

    /// The bundle directories under `models_dir`, by name.
    fn bundles(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.models_dir) else { return Vec::new() };
        let mut names: Vec<String> = entries
            .flatten()
            .filter(|e| e.path().join(crate::model::manifest::MANIFEST_FILE).is_file())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect();
        names.sort();
        names
    }

    fn live_page(&self) -> String {
        let model = self.model.lock().expect("model lock").name.clone();
        pages::live(&self.node, &self.tiles(), &self.bundles(), &model)
    }

    fn review_page(&self, query: Option<&str>) -> Reply {
        let cameras = self.camera_ids();
        let camera = query_value(query, "camera").filter(|c| !c.is_empty());
        let label = query_value(query, "label").unwrap_or_default();
        let filter = if label.is_empty() { Some(LabelFilter::All) } else { LabelFilter::parse(&label) };
        let Some(filter) = filter else {
            return reply(400, TEXT, format!("label={label:?}: expected all, unlabelled, defect or normal\n"));
        };
        if let Some(c) = camera.as_deref().filter(|c| !cameras.iter().any(|k| k == c)) {
            return reply(404, TEXT, format!("camera={c:?}: no such camera\n"));
        }
        let shown: Vec<String> =
            cameras.iter().filter(|c| camera.as_deref().is_none_or(|k| k == *c)).cloned().collect();
        let since = SystemTime::now() - self.review_window;
        let alerts = self.store.as_ref().map(|store| review::alerts(store, &shown, since, filter));
        let events: Vec<serde_json::Value> = self
            .board
            .events()
            .into_iter()
            .filter(|e| camera.as_deref().is_none_or(|c| e.get("camera").and_then(|v| v.as_str()) == Some(c)))
            .collect();
        reply(200, HTML, pages::review(&self.node, &cameras, (camera.as_deref(), filter), &events, alerts.as_deref()))
    }

    fn history_page(&self, query: Option<&str>) -> Reply {
        let minutes = self.minutes(query);
        let rows: Vec<(String, f64, [u32; 2])> = self
            .cameras
            .active()
            .into_iter()
            .map(|(_, c)| {
                let alerts = |seconds| self.board.history(&c.id, seconds).iter().map(|b| b.alerts).sum::<u32>();
                (c.id.clone(), c.controls.sensitivity(), [alerts(600), alerts(minutes * 60)])
            })
            .collect();
        reply(200, HTML, pages::history(&self.node, &rows, minutes))
    }

    /// `/api/state`: the cameras as the live page shows them.
    fn state(&self) -> serde_json::Value {
        let cameras: Vec<serde_json::Value> = self
            .tiles()
            .into_iter()
            .map(|t| {
                serde_json::json!({
                    "camera": t.camera, "status": t.status, "enabled": t.enabled,
                    "sensitivity": t.sensitivity, "fps": t.fps, "last": t.last,
                })
            })
            .collect();
        let model = self.model.lock().expect("model lock").clone();
        serde_json::json!({ "node": self.node, "model": *model, "writable": self.token.is_some(), "cameras": cameras })
    }

    /// `POST /api/<camera>/<feature>` or `/api/model`: the MQTT command of the same name,
    /// once the request is allowed to write.
    fn write(&self, request: &Request, command: &str) -> Reply {
        if let Err((status, why)) = self.may_write(request.headers) {
            tracing::warn!(path = %request.path, reason = %why, "Review page write refused.");
            return reply(status, TEXT, format!("{why}\n"));
        }
        let path = if command == "model" { "model/set".to_string() } else { format!("{command}/set") };
        match self.control.execute(&path, request.body, "web") {
            Ok(()) => reply(200, TEXT, "done\n"),
            Err(e) => reply(400, TEXT, format!("refused: {e}\n")),
        }
    }

    /// `Ok` for a same-origin request carrying the token; else the status and the reason.
    fn may_write(&self, headers: &HeaderMap) -> Result<(), (u16, String)> {
        let Some(token) = &self.token else {
            return Err((403, "the review page is read-only: no http.token is configured".into()));
        };
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        if header("sec-fetch-site").is_some_and(|site| site != "same-origin" && site != "none") {
            return Err((403, "a cross-site write is refused".into()));
        }
        if let Some(origin) = header("origin") {
            let own = header("host").is_some_and(|host| origin.split_once("://").is_some_and(|(_, h)| h == host));
            if !own {
                return Err((403, format!("a write from origin {origin:?} is refused: not this page's own")));
            }
        }
        let given = header(TOKEN_HEADER).unwrap_or_default();
        if bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
            Ok(())
        } else {
            Err((401, format!("a write needs the token in the {TOKEN_HEADER} header")))
        }
    }
}
