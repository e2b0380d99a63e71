//! The daemon's HTTP endpoint, for plant monitoring: `/metrics` in the Prometheus text
//! format (OpenMetrics, through `prometheus-client`) and `/healthz`; every other path is
//! the review page's (`daemon::web`), whose live page holds at most [`MAX_STREAMS`] pushed
//! streams open, each for [`STREAM_FOR`] (the browser reconnects), and whose writes have a
//! body of at most [`MAX_BODY`] bytes.
//!
//! It listens from before the model loads, so a probe sees `503 loading model` rather than
//! a refused connection; once the pipeline runs, [`Endpoint::ready`] hands it what to
//! report. Metrics are read at scrape time from the counters and histograms the stages
//! keep anyway (`stats`), so `/metrics` and the MQTT `stats` payload cannot disagree.
//! `/healthz` is `200` while the model is loaded, the inference worker turns (its progress
//! within `pipeline.stage_timeout_ms`) and — with MQTT on — alerts can be kept in the outbox
//! and published; `503` with the reason otherwise (`degraded: …` for the last two).
//!
//! It cannot be starved: hyper's HTTP/1 server on a current-thread tokio runtime serves at
//! most [`MAX_CONNECTIONS`] at once (a connection beyond them is closed at once, counted),
//! one request per connection, and a connection that has not sent its request head within
//! [`HEADER_TIMEOUT`] or is not done within [`CONNECTION_TIMEOUT`] is closed. An accept
//! that fails (out of descriptors) is counted and retried after a pause; the listener
//! never ends before [`Endpoint::shutdown`].

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::Bytes;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use super::cameras::{Camera, Cameras};
use super::web::{self, Site};
use crate::stats::{CameraStatus, DropReason, LogThrottle, PipelineStats, Progress};

/// Connections served at once; more are closed on accept.
pub const MAX_CONNECTIONS: usize = 32;
/// Time a client has to send its request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a connection may take in all.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after an accept that failed (out of descriptors), before the next.
const ACCEPT_PAUSE: Duration = Duration::from_millis(200);
/// Live pages pushed to at once (each holds a connection).
pub const MAX_STREAMS: usize = 8;
/// How long one pushed stream lasts before the browser reconnects (within
/// [`CONNECTION_TIMEOUT`]).
pub const STREAM_FOR: Duration = Duration::from_secs(25);
/// The largest request body read (a write of the review page is a few bytes).
pub const MAX_BODY: usize = crate::daemon::mqtt::control::MAX_COMMAND_BYTES;

/// The endpoint's own counters (also in `/metrics`).
#[derive(Debug, Default)]
pub struct HttpStats {
    /// Connections closed on accept because [`MAX_CONNECTIONS`] were being served.
    pub rejected: AtomicU64,
    /// Accepts that failed (`EMFILE` and the like).
    pub accept_errors: AtomicU64,
    /// Live-page streams refused because [`MAX_STREAMS`] were open.
    pub streams_refused: AtomicU64,
    /// Pushed verdicts a slow live page skipped.
    pub stream_lagged: AtomicU64,
}

/// What the endpoint reports once the pipeline runs.
pub struct Report {
    /// The configured cameras (their queues are read as depth gauges).
    pub cameras: Cameras,
    pub pipeline: Arc<PipelineStats>,
    /// The model in use now, and where it runs.
    pub model: super::models::CurrentModel,
    pub provider: String,
    /// The inference worker's progress and the bound it must keep.
    pub worker: Progress,
    pub stage_timeout: Duration,
    /// Alerts go to MQTT: health says degraded while they cannot be kept or published.
    pub mqtt: bool,
    /// The uploader's counters, with `[upload]` on.
    pub upload: Option<Arc<super::upload::UploadStats>>,
}

/// What `/healthz` watches.
struct Health {
    worker: Progress,
    bound: Duration,
    pipeline: Arc<PipelineStats>,
    mqtt: bool,
}

/// The listening socket and, once set, the report.
pub struct Endpoint {
    /// Taken by [`Endpoint::serve`].
    listener: Mutex<Option<std::net::TcpListener>>,
    addr: SocketAddr,
    report: OnceLock<Registry>,
    health: OnceLock<Health>,
    site: OnceLock<Site>,
    stats: Arc<HttpStats>,
    streams: Arc<tokio::sync::Semaphore>,
    stop: tokio::sync::watch::Sender<bool>,
}

type Body = BoxBody<Bytes, std::convert::Infallible>;
type Response = hyper::Response<Body>;

impl Endpoint {
    /// Binds `addr`; the error names the address.
    pub fn bind(addr: SocketAddr) -> Result<Arc<Self>, String> {
        let fail = |e: std::io::Error| format!("cannot listen on {addr}: {e}");
        let listener = std::net::TcpListener::bind(addr).map_err(fail)?;
        listener.set_nonblocking(true).map_err(fail)?;
        let addr = listener.local_addr().map_err(fail)?;
        tracing::info!(addr = %addr, "HTTP endpoint listening (/metrics, /healthz, the review page at /).");
        Ok(Arc::new(Self {
            listener: Mutex::new(Some(listener)),
            addr,
            report: OnceLock::new(),
            health: OnceLock::new(),
            site: OnceLock::new(),
            stats: Arc::default(),
            streams: Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS)),
            stop: tokio::sync::watch::channel(false).0,
        }))
    }

    /// From now on `/metrics` reports `report`, `/healthz` watches its worker and the
    /// review page shows `site`.
    pub fn ready(&self, report: Report, site: Site) {
        let _ = self.site.set(site);
        let health = Health {
            worker: report.worker.clone(),
            bound: report.stage_timeout,
            pipeline: report.pipeline.clone(),
            mqtt: report.mqtt,
        };
        let mut registry = Registry::default();
        registry.register_collector(Box::new(report));
        registry.register_collector(Box::new(HttpCounters(self.stats.clone())));
        let _ = self.report.set(registry);
        let _ = self.health.set(health);
    }

    /// Serves requests until [`Endpoint::shutdown`], on a runtime of its own.
    pub fn serve(self: &Arc<Self>) -> std::io::Result<()> {
        let Some(listener) = self.listener.lock().expect("listener lock").take() else { return Ok(()) };
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(self.clone().accept_loop(listener))?;
        tracing::debug!(addr = %self.addr, "HTTP endpoint stopped.");
        Ok(())
    }

    async fn accept_loop(self: Arc<Self>, listener: std::net::TcpListener) -> std::io::Result<()> {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let mut stop = self.stop.subscribe();
        let failures = LogThrottle::new(Duration::from_secs(10));
        loop {
            let accepted = tokio::select! {
                _ = stop.wait_for(|stopped| *stopped) => return Ok(()),
                accepted = listener.accept() => accepted,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    self.stats.accept_errors.fetch_add(1, Relaxed);
                    if let Some(suppressed) = failures.admit() {
                        tracing::warn!(error = %e, suppressed, "HTTP accept failed; retrying.");
                    }
                    tokio::time::sleep(ACCEPT_PAUSE).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                self.stats.rejected.fetch_add(1, Relaxed);
                drop(stream);
                continue;
            };
            let endpoint = self.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(CONNECTION_TIMEOUT, endpoint.connection(stream)).await;
                drop(slot);
            });
        }
    }

    /// One request on `stream`, then the connection closes.
    async fn connection(self: Arc<Self>, stream: tokio::net::TcpStream) {
        let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let endpoint = self.clone();
            async move { Ok::<_, std::convert::Infallible>(endpoint.request(request).await) }
        });
        let served = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .keep_alive(false)
            .max_buf_size(16 << 10)
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
            .await;
        if let Err(e) = served {
            tracing::debug!(error = %e, "HTTP connection ended with an error.");
        }
    }

    /// Makes [`Endpoint::serve`] return.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }

    /// Reads the body (bounded) and answers: monitoring paths here, the rest the page's.
    async fn request(&self, request: hyper::Request<hyper::body::Incoming>) -> Response {
        let (parts, body) = request.into_parts();
        let body = match Limited::new(body, MAX_BODY).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => return plain(413, format!("a request body has at most {MAX_BODY} bytes\n")),
        };
        let path = parts.uri.path();
        if let Some(response) = self.monitoring(path) {
            return response;
        }
        let Some(site) = self.site.get() else { return plain(503, "loading model\n".into()) };
        let page = web::Request {
            method: &parts.method,
            path,
            query: parts.uri.query(),
            headers: &parts.headers,
            body: &body,
        };
        match site.handle(&page) {
            Some(web::Reply::Body { status, content_type, body }) => {
                response(status, content_type, Full::new(Bytes::from(body)).boxed())
            }
            Some(web::Reply::Stream(listener)) => match self.streams.clone().try_acquire_owned() {
                Ok(slot) => response(200, "text/event-stream", event_stream(listener, slot, self.stats.clone())),
                Err(_) => {
                    self.stats.streams_refused.fetch_add(1, Relaxed);
                    plain(503, format!("{MAX_STREAMS} live pages are open already; try again\n"))
                }
            },
            None => plain(404, "not found: try /, /review, /history, /metrics or /healthz\n".into()),
        }
    }

    /// `/metrics` and `/healthz`; `None` for other paths.
    fn monitoring(&self, path: &str) -> Option<Response> {
        let (status, content_type, body) = match path {
            "/metrics" => match self.report.get() {
                Some(registry) => {
                    let mut text = String::new();
                    match prometheus_client::encoding::text::encode(&mut text, registry) {
                        Ok(()) => (200, "application/openmetrics-text; version=1.0.0; charset=utf-8", text),
                        Err(_) => (500, "text/plain", "cannot encode the metrics\n".into()),
                    }
                }
                None => (503, "text/plain", "loading model\n".into()),
            },
            "/healthz" => {
                let (status, text) = self.health();
                (status, "text/plain", text)
            }
            _ => return None,
        };
        Some(response(status, content_type, Full::new(Bytes::from(body)).boxed()))
    }

    /// `200 ok`, or `503` with what is wrong: loading, a stuck worker, or — degraded —
    /// alerts that cannot be kept (the outbox cannot be written) or published (no broker).
    fn health(&self) -> (u16, String) {
        let Some(health) = self.health.get() else { return (503, "loading model\n".into()) };
        if let Some(since) = health.worker.stuck_past(health.bound) {
            return (503, format!("inference worker stuck for {:.1} s\n", since.as_secs_f64()));
        }
        let p = &health.pipeline;
        if health.mqtt && p.outbox_failing.load(Relaxed) {
            return (503, "degraded: the MQTT outbox cannot be written; alerts are not kept\n".into());
        }
        if health.mqtt && !p.mqtt_connected.load(Relaxed) {
            return (503, "degraded: the MQTT broker is not connected; alerts wait in the outbox\n".into());
        }
        (200, "ok: model loaded, inference worker turning\n".into())
    }
}

/// A response with the headers every answer carries: nothing is cached, framed, sniffed
/// or loaded from elsewhere.
fn response(status: u16, content_type: &str, body: Body) -> Response {
    hyper::Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .header(hyper::header::CACHE_CONTROL, "no-store")
        .header(hyper::header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header(hyper::header::X_FRAME_OPTIONS, "DENY")
        .header(hyper::header::REFERRER_POLICY, "no-referrer")
        .header(hyper::header::CONTENT_SECURITY_POLICY, "default-src 'self'; frame-ancestors 'none'")
        .body(body)
        .expect("a valid response")
}

fn plain(status: u16, text: String) -> Response {
    response(status, "text/plain; charset=utf-8", Full::new(Bytes::from(text)).boxed())
}

/// The pushed verdicts as server-sent events for [`STREAM_FOR`], holding `slot` while
/// open; a listener that fell behind skips ahead (counted).
fn event_stream(
    listener: tokio::sync::broadcast::Receiver<String>,
    slot: tokio::sync::OwnedSemaphorePermit,
    stats: Arc<HttpStats>,
) -> Body {
    use tokio::sync::broadcast::error::RecvError;
    let deadline = tokio::time::Instant::now() + STREAM_FOR;
    let opening = futures_util::stream::once(async { Bytes::from_static(b"retry: 1000\n\n") });
    let verdicts = futures_util::stream::unfold((listener, slot), move |(mut listener, slot)| {
        let stats = stats.clone();
        async move {
            loop {
                match tokio::time::timeout_at(deadline, listener.recv()).await {
                    Ok(Ok(verdict)) => return Some((Bytes::from(format!("data: {verdict}\n\n")), (listener, slot))),
                    Ok(Err(RecvError::Lagged(skipped))) => {
                        stats.stream_lagged.fetch_add(skipped, Relaxed);
                    }
                    Ok(Err(RecvError::Closed)) | Err(_) => return None,
                }
            }
        }
    });
    let frames = futures_util::StreamExt::map(futures_util::StreamExt::chain(opening, verdicts), |bytes| {
        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(bytes))
    });
    StreamBody::new(frames).boxed()
}

impl std::fmt::Debug for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Report").field("cameras", &self.cameras.active().len()).finish_non_exhaustive()
    }
}

/// Encodes one per-camera metric of `kind` with `value(camera)`.
fn per_camera<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    cameras: &[Arc<Camera>],
    (name, help, kind): (&str, &str, MetricType),
    value: impl Fn(&Camera) -> M,
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for camera in cameras {
        let labels = [("camera", camera.id.as_str())];
        value(camera).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Encodes one node-wide metric.
fn single(
    encoder: &mut DescriptorEncoder,
    (name, help, kind): (&str, &str, MetricType),
    metric: &impl EncodeMetric,
) -> std::fmt::Result {
    metric.encode(encoder.encode_descriptor(name, help, None, kind)?)
}

/// The endpoint's own counters in `/metrics`.
#[derive(Debug)]
struct HttpCounters(Arc<HttpStats>);

impl Collector for HttpCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let counters = [
            ("edge_inspect_http_rejected", "HTTP connections closed on accept: too many at once", &self.0.rejected),
            ("edge_inspect_http_accept_errors", "HTTP accepts that failed (out of descriptors)", &self.0.accept_errors),
            (
                "edge_inspect_http_streams_refused",
                "Live-page streams refused: the most were open",
                &self.0.streams_refused,
            ),
            ("edge_inspect_http_stream_lagged", "Pushed verdicts a slow live page skipped", &self.0.stream_lagged),
        ];
        for (name, help, value) in counters {
            single(&mut encoder, (name, help, MetricType::Counter), &ConstCounter::new(value.load(Relaxed)))?;
        }
        // The build this process runs (a package upgrade that did not restart shows here).
        let build = [("version", env!("EDGE_INSPECT_VERSION")), ("commit", env!("EDGE_INSPECT_COMMIT"))];
        single(&mut encoder, ("edge_inspect_build", "The running build", MetricType::Info), &Info::new(build))
    }
}

impl Collector for Report {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        use MetricType::{Counter, Gauge, Histogram};
        let cams: &Vec<Arc<Camera>> = &self.cameras.active().into_iter().map(|(_, c)| c).collect();
        let count = |v: &std::sync::atomic::AtomicU64| ConstCounter::new(v.load(Relaxed));
        per_camera(&mut encoder, cams, ("edge_inspect_frames_in", "Frames read from the camera", Counter), |c| {
            count(&c.stats.frames_in)
        })?;
        per_camera(&mut encoder, cams, ("edge_inspect_frames_processed", "Frames inspected", Counter), |c| {
            count(&c.stats.processed)
        })?;
        per_camera(&mut encoder, cams, ("edge_inspect_anomalies", "Frames judged anomalous", Counter), |c| {
            count(&c.stats.anomalies)
        })?;
        let mut dropped =
            encoder.encode_descriptor("edge_inspect_frames_dropped", "Frames dropped, by reason", None, Counter)?;
        for camera in cams {
            for reason in DropReason::ALL {
                let labels = [("camera", camera.id.as_str()), ("reason", reason.as_str())];
                ConstCounter::new(camera.stats.drops(reason)).encode(dropped.encode_family(&labels)?)?;
            }
        }
        per_camera(
            &mut encoder,
            cams,
            ("edge_inspect_queue_depth", "Frames waiting in the camera queue", Gauge),
            |c| ConstGauge::new(c.queue_rx.len() as i64),
        )?;
        per_camera(
            &mut encoder,
            cams,
            ("edge_inspect_camera_online", "1 while the camera delivers frames", Gauge),
            |c| ConstGauge::new(i64::from(c.stats.status() == CameraStatus::Online)),
        )?;
        per_camera(
            &mut encoder,
            cams,
            ("edge_inspect_capture_to_publish_seconds", "From capture to the published verdict", Histogram),
            |c| c.stats.latency.clone(),
        )?;
        per_camera(
            &mut encoder,
            cams,
            ("edge_inspect_score", "Normalised anomaly score per frame (1 = image threshold)", Histogram),
            |c| c.stats.scores.clone(),
        )?;
        per_camera(
            &mut encoder,
            cams,
            ("edge_inspect_trigger_to_verdict_seconds", "From a trigger to its published verdict", Histogram),
            |c| c.stats.trigger_latency.clone(),
        )?;
        let mut verdicts = encoder.encode_descriptor(
            "edge_inspect_verdicts",
            "Verdicts on triggered parts, by verdict",
            None,
            Counter,
        )?;
        for camera in cams {
            for (i, verdict) in crate::capture::trigger::VERDICTS.iter().enumerate() {
                let labels = [("camera", camera.id.as_str()), ("verdict", *verdict)];
                let count = camera.stats.verdicts[i].load(Relaxed);
                ConstCounter::new(count).encode(verdicts.encode_family(&labels)?)?;
            }
        }
        let p = &self.pipeline;
        single(
            &mut encoder,
            ("edge_inspect_inference_seconds", "Inference time per batch", Histogram),
            &p.inference_seconds,
        )?;
        single(&mut encoder, ("edge_inspect_batch_frames", "Frames per inference batch", Histogram), &p.batch_frames)?;
        let connected = ConstGauge::new(i64::from(p.mqtt_connected.load(Relaxed)));
        single(&mut encoder, ("edge_inspect_mqtt_connected", "1 while connected to the broker", Gauge), &connected)?;
        let outbox = ConstGauge::new(p.outbox_queued.load(Relaxed) as i64);
        single(
            &mut encoder,
            ("edge_inspect_outbox_messages", "Messages waiting in the on-disk outbox", Gauge),
            &outbox,
        )?;
        let counters = [
            ("edge_inspect_mqtt_connects", "Connections made to the broker", &p.mqtt_connects),
            ("edge_inspect_mqtt_failures", "Failed connection attempts", &p.mqtt_failures),
            (
                "edge_inspect_mqtt_unresponsive",
                "Connections dropped because the broker stopped answering",
                &p.mqtt_unresponsive,
            ),
            ("edge_inspect_outbox_dropped", "Outbox messages dropped (size cap, age, refused)", &p.outbox_dropped),
            (
                "edge_inspect_outbox_write_failures",
                "Durable messages the outbox could not keep",
                &p.outbox_write_failures,
            ),
            ("edge_inspect_tiles", "Tiles inspected", &p.tiles),
            (
                "edge_inspect_tiles_screened",
                "Tiles the cascade's screen declared clean (not reconstructed)",
                &p.tiles_screened,
            ),
            ("edge_inspect_recorder_errors", "Failed recordings and deletes", &p.recorder_errors),
            (
                "edge_inspect_recorder_low_disk",
                "Frames not recorded: free space under the recorder's floor",
                &p.recorder_low_disk,
            ),
        ];
        for (name, help, value) in counters {
            single(&mut encoder, (name, help, Counter), &count(value))?;
        }
        if let Some(upload) = &self.upload {
            let counters = [
                ("edge_inspect_upload_files", "Files of the capture store uploaded", &upload.files),
                ("edge_inspect_upload_bytes", "Bytes uploaded", &upload.bytes),
                ("edge_inspect_upload_failures", "Uploads that failed (retried after a backoff)", &upload.failures),
            ];
            for (name, help, value) in counters {
                single(&mut encoder, (name, help, Counter), &count(value))?;
            }
            let pending = ConstGauge::new(upload.pending.load(Relaxed) as i64);
            single(&mut encoder, ("edge_inspect_upload_pending", "Files waiting to be uploaded", Gauge), &pending)?;
        }
        let model = self.model.lock().expect("model lock").clone();
        let labels = [
            ("name", model.name.clone()),
            ("version", model.version.clone()),
            ("sha256", model.sha256.clone()),
            ("provider", self.provider.clone()),
        ];
        single(&mut encoder, ("edge_inspect_model", "The model being run", MetricType::Info), &Info::new(labels))
    }
}
