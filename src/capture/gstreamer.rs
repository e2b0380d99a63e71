//! GStreamer sources: any pipeline that ends in decoded video — RTSP/H.264 from IP cameras
//! and encoders (`uri = "rtsp://…"`, or `pipeline = "rtspsrc location=… ! decodebin"`),
//! files, test patterns — read through an appsink.
//!
//! The source owns the pipeline it builds (`<pipeline> ! videoconvert ! video/x-raw,
//! format=GRAY8|RGB ! appsink`: caps negotiated to the model's channels), the bounded queue
//! between GStreamer's streaming thread and the capture thread (newest wins; what gives way is
//! counted), and the credentials it hands to the elements that take them (`user-id` and
//! `user-pw`: rtspsrc, souphttpsrc), which never appear in a description or a log line. An
//! error or the end of the stream is a `Read` error: the capture thread reopens with backoff.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded, select};
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_video as gst_video;
use image::{DynamicImage, GrayImage, RgbImage};

use super::{CaptureError, FrameSource, StreamContext};

/// The appsink's name inside the pipeline this module builds.
const SINK: &str = "edge_inspect_sink";
/// The uridecodebin's name when the source is a `uri`.
const URI_SOURCE: &str = "edge_inspect_uri";

/// Where the video comes from: a URI for `uridecodebin`, or a launch line of one's own.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Uri(String),
    Pipeline(String),
}

/// A `[[cameras]]` table with `source = "gstreamer"`, validated.
#[derive(Clone, PartialEq)]
pub struct GstSettings {
    pub input: Input,
    /// For elements that authenticate (`user-id`/`user-pw`); the password comes from a file
    /// or a systemd credential.
    pub credentials: Option<(String, String)>,
    /// Frames held between the pipeline and the capture thread (newest wins).
    pub buffers: usize,
}

// Written by hand so that a password never reaches a log line through `{:?}`.
impl fmt::Debug for GstSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let input = match &self.input {
            Input::Uri(uri) => format!("uri {uri}"),
            Input::Pipeline(p) => format!("pipeline {p}"),
        };
        let user = self.credentials.as_ref().map(|(user, _)| format!("{user} (password set)"));
        f.debug_struct("GstSettings")
            .field("input", &input)
            .field("user", &user)
            .field("buffers", &self.buffers)
            .finish()
    }
}

impl GstSettings {
    /// The launch line: the input, then conversion to the model's pixel format and the sink.
    fn description(&self, channels: usize) -> String {
        let format = if channels == 1 { "GRAY8" } else { "RGB" };
        let head = match &self.input {
            Input::Uri(_) => format!("uridecodebin name={URI_SOURCE}"),
            Input::Pipeline(p) => p.clone(),
        };
        format!(
            "{head} ! videoconvert ! video/x-raw,format={format} ! appsink name={SINK} sync=false max-buffers=1 drop=false"
        )
    }
}

/// Checks a launch line without starting it (elements exist, links parse): `check-config`
/// refuses a pipeline that could never run.
pub fn check_pipeline(settings: &GstSettings) -> Result<(), String> {
    gst::init().map_err(|e| format!("GStreamer cannot start: {e}"))?;
    gst::parse::launch(&settings.description(3)).map(drop).map_err(|e| e.to_string())
}

/// What the streaming thread hands over: a frame, or a reason the stream is over.
type Item = Result<DynamicImage, CaptureError>;

/// A running pipeline and the receiving end of its bounded queue.
pub struct GstSource {
    context: StreamContext,
    pipeline: gst::Pipeline,
    items: Receiver<Item>,
    /// Frames that gave way to newer ones before the capture thread took them.
    dropped: Arc<AtomicU64>,
    reported: u64,
}

/// The queue's sending side: newest wins, the item that gives way is counted if a frame.
#[derive(Clone)]
struct Queue {
    tx: Sender<Item>,
    rx: Receiver<Item>,
    dropped: Arc<AtomicU64>,
}

impl Queue {
    fn push(&self, mut item: Item) {
        loop {
            match self.tx.try_send(item) {
                Ok(()) | Err(TrySendError::Disconnected(_)) => return,
                Err(TrySendError::Full(back)) => {
                    if let Ok(Ok(_)) = self.rx.try_recv() {
                        self.dropped.fetch_add(1, Relaxed);
                    }
                    item = back;
                }
            }
        }
    }
}

impl GstSource {
    /// Builds and starts the pipeline, in the model's pixel format (GRAY8 or RGB).
    pub fn open(settings: &GstSettings, context: StreamContext) -> Result<Self, CaptureError> {
        let (id, channels, max_pixels) = (context.camera.as_str(), context.channels, context.max_pixels);
        let open_error =
            |reason: String| CaptureError::Open { camera: id.to_string(), device: describe(settings), reason };
        gst::init().map_err(|e| open_error(format!("GStreamer cannot start: {e}")))?;
        let pipeline = gst::parse::launch(&settings.description(channels))
            .map_err(|e| open_error(e.to_string()))?
            .downcast::<gst::Pipeline>()
            .map_err(|_| open_error("the description is not a pipeline".into()))?;
        if let (Input::Uri(uri), Some(source)) = (&settings.input, pipeline.by_name(URI_SOURCE)) {
            source.set_property("uri", uri);
        }
        if let Some((user, password)) = settings.credentials.clone() {
            lend_credentials(&pipeline, user, password);
        }
        let (tx, rx) = bounded(settings.buffers.max(1));
        let dropped = Arc::new(AtomicU64::new(0));
        let queue = Queue { tx, rx: rx.clone(), dropped: dropped.clone() };
        connect_sink(id, &pipeline, &queue, max_pixels).map_err(open_error)?;
        forward_errors(id, &pipeline, &queue);
        pipeline.set_state(gst::State::Playing).map_err(|e| open_error(format!("cannot start: {e}")))?;
        tracing::info!(camera = id, source = %describe(settings), "GStreamer pipeline started.");
        Ok(Self { context, pipeline, items: rx, dropped, reported: 0 })
    }

    fn read_error(&self, reason: String) -> CaptureError {
        CaptureError::Read { camera: self.context.camera.clone(), reason }
    }
}

impl FrameSource for GstSource {
    fn camera(&self) -> &str {
        &self.context.camera
    }

    /// The next frame, an error, or `Stopped` when the capture thread is told to stop.
    fn next_frame(&mut self) -> Item {
        select! {
            recv(self.items) -> item => item.unwrap_or_else(|_| Err(self.read_error("the pipeline is gone".into()))),
            recv(self.context.stop) -> _ => Err(CaptureError::Stopped { camera: self.context.camera.clone() }),
            default(self.context.stall) => {
                Err(self.read_error(format!("no frame for {:.1} s", self.context.stall.as_secs_f64())))
            }
        }
    }

    fn take_dropped(&mut self) -> u64 {
        let total = self.dropped.load(Relaxed);
        let new = total - self.reported;
        self.reported = total;
        new
    }
}

impl Drop for GstSource {
    fn drop(&mut self) {
        if let Some(bus) = self.pipeline.bus() {
            bus.unset_sync_handler();
        }
        if let Err(e) = self.pipeline.set_state(gst::State::Null) {
            tracing::warn!(camera = %self.context.camera, error = %e, "GStreamer pipeline did not stop cleanly.");
        }
    }
}

/// The source as logs may show it: the URI without any user information, or the pipeline.
pub fn describe(settings: &GstSettings) -> String {
    match &settings.input {
        Input::Uri(uri) => uri.clone(),
        Input::Pipeline(p) => p.clone(),
    }
}

/// Sets `user-id`/`user-pw` on every element that has them, now and as elements are added
/// later (uridecodebin creates its rtspsrc once the pipeline starts).
fn lend_credentials(pipeline: &gst::Pipeline, user: String, password: String) {
    let apply = move |element: &gst::Element| {
        if element.has_property("user-id") && element.has_property("user-pw") {
            element.set_property("user-id", &user);
            element.set_property("user-pw", &password);
        }
    };
    pipeline.iterate_recurse().foreach(|element| apply(&element)).ok();
    pipeline.connect_deep_element_added(move |_, _, element| apply(element));
}

/// Hands every sample to the queue as an image; the end of the stream as a `Read` error.
fn connect_sink(id: &str, pipeline: &gst::Pipeline, queue: &Queue, max_pixels: u64) -> Result<(), String> {
    let sink = pipeline
        .by_name(SINK)
        .and_then(|e| e.downcast::<gst_app::AppSink>().ok())
        .ok_or("the pipeline has no appsink (a description must not end in one of its own)")?;
    let (camera, frames, ends) = (id.to_string(), queue.clone(), queue.clone());
    let camera_at_end = camera.clone();
    sink.set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |sink| {
                let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                frames.push(to_image(&camera, &sample, max_pixels));
                Ok(gst::FlowSuccess::Ok)
            })
            .eos(move |_| {
                ends.push(Err(CaptureError::Read { camera: camera_at_end.clone(), reason: "end of stream".into() }))
            })
            .build(),
    );
    Ok(())
}

/// Errors posted on the bus (a refused connection, a lost server, a decoder failure) go to
/// the queue, so the capture thread sees them without polling the bus.
fn forward_errors(id: &str, pipeline: &gst::Pipeline, queue: &Queue) {
    let (camera, queue) = (id.to_string(), queue.clone());
    let Some(bus) = pipeline.bus() else { return };
    bus.set_sync_handler(move |_, message| {
        if let gst::MessageView::Error(error) = message.view() {
            let origin = error.src().map(|s| s.path_string().to_string()).unwrap_or_default();
            let reason = format!("{origin}: {}", error.error());
            queue.push(Err(CaptureError::Read { camera: camera.clone(), reason }));
        }
        gst::BusSyncReply::Drop
    });
}

/// Copies a GRAY8 or RGB sample (rows may be padded to a stride) into an image.
fn to_image(camera: &str, sample: &gst::Sample, max_pixels: u64) -> Item {
    let decode_error = |reason: &str| CaptureError::Decode {
        camera: camera.to_string(),
        format: "video/x-raw".into(),
        width: 0,
        height: 0,
        bytes: 0,
        reason: reason.to_string(),
    };
    let info = sample
        .caps()
        .and_then(|caps| gst_video::VideoInfo::from_caps(caps).ok())
        .ok_or_else(|| decode_error("a sample without video caps"))?;
    let (width, height) = (info.width(), info.height());
    if u64::from(width) * u64::from(height) > max_pixels {
        let what = "from the pipeline".to_string();
        return Err(CaptureError::TooLarge { camera: camera.to_string(), what, width, height, limit: max_pixels });
    }
    let buffer = sample.buffer().ok_or_else(|| decode_error("a sample without a buffer"))?;
    let map = buffer.map_readable().map_err(|_| decode_error("the buffer cannot be read"))?;
    let channels = if info.format() == gst_video::VideoFormat::Gray8 { 1 } else { 3 };
    let (row, stride) = (width as usize * channels, info.stride()[0] as usize);
    if stride < row || map.len() < stride * (height as usize - 1) + row {
        return Err(CaptureError::Decode {
            camera: camera.to_string(),
            format: info.format().to_str().to_string(),
            width,
            height,
            bytes: map.len(),
            reason: format!("stride {stride} does not hold rows of {row} bytes"),
        });
    }
    let mut pixels = Vec::with_capacity(row * height as usize);
    for y in 0..height as usize {
        pixels.extend_from_slice(&map[y * stride..y * stride + row]);
    }
    Ok(if channels == 1 {
        DynamicImage::ImageLuma8(GrayImage::from_raw(width, height, pixels).expect("sized above"))
    } else {
        DynamicImage::ImageRgb8(RgbImage::from_raw(width, height, pixels).expect("sized above"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn settings(pipeline: &str, buffers: usize) -> GstSettings {
        GstSettings { input: Input::Pipeline(pipeline.into()), credentials: None, buffers }
    }

    fn context(camera: &str, channels: usize, max_pixels: u64, stall_s: u64, stop: Receiver<()>) -> StreamContext {
        StreamContext { camera: camera.into(), channels, max_pixels, stall: Duration::from_secs(stall_s), stop }
    }

    fn open(pipeline: &str, buffers: usize, channels: usize, max_pixels: u64) -> (GstSource, Sender<()>) {
        let (stop_tx, stop_rx) = bounded(0);
        let s = settings(pipeline, buffers);
        (GstSource::open(&s, context("cam", channels, max_pixels, 30, stop_rx)).unwrap(), stop_tx)
    }

    #[test]
    fn a_test_pattern_arrives_in_the_models_pixel_format_then_the_stream_ends() {
        let pattern = "videotestsrc num-buffers=3 pattern=white ! video/x-raw,width=322,height=241";
        let (mut grey, _stop) = open(pattern, 8, 1, 1 << 20);
        for _ in 0..3 {
            let frame = grey.next_frame().unwrap();
            assert!(matches!(frame, DynamicImage::ImageLuma8(_)));
            // An odd width: GStreamer pads each row to 4 bytes, the image has none.
            assert_eq!((frame.width(), frame.height()), (322, 241));
            assert!(frame.to_luma8().pixels().all(|p| p.0[0] >= 235), "white is white");
        }
        let end = grey.next_frame().unwrap_err();
        assert!(matches!(&end, CaptureError::Read { reason, .. } if reason == "end of stream"), "{end}");
        let (mut rgb, _stop) = open(pattern, 8, 3, 1 << 20);
        assert!(matches!(rgb.next_frame().unwrap(), DynamicImage::ImageRgb8(_)));
    }

    /// Newest wins: a pipeline far faster than its reader keeps at most `buffers` frames
    /// and counts every frame that gave way.
    #[test]
    fn a_slow_reader_gets_the_newest_frames_and_the_rest_is_counted() {
        let (mut source, _stop) = open("videotestsrc num-buffers=40 ! video/x-raw,width=32,height=24", 2, 1, 1 << 20);
        // The end of the stream is queued behind the frames: wait on the drop counter.
        let started = std::time::Instant::now();
        while source.dropped.load(Relaxed) < 39 {
            assert!(started.elapsed() < Duration::from_secs(30), "dropped {}", source.dropped.load(Relaxed));
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(source.next_frame().is_ok(), "the newest frame is kept");
        assert!(matches!(source.next_frame(), Err(CaptureError::Read { .. })), "then the end of the stream");
        assert_eq!(source.take_dropped(), 39);
        assert_eq!(source.take_dropped(), 0, "counted once");
    }

    #[test]
    fn a_frame_over_the_pixel_limit_is_refused() {
        let (mut source, _stop) = open("videotestsrc num-buffers=1 ! video/x-raw,width=128,height=64", 2, 1, 4096);
        let e = source.next_frame().unwrap_err();
        assert!(matches!(e, CaptureError::TooLarge { width: 128, height: 64, limit: 4096, .. }), "{e}");
    }

    #[test]
    fn a_missing_element_and_a_refused_connection_name_the_camera_and_the_cause() {
        let (_tx, stop) = bounded(0);
        let bad = settings("nosuchsource-xyz ! decodebin", 2);
        let e = GstSource::open(&bad, context("line-3", 1, 1 << 20, 5, stop.clone())).err().unwrap();
        assert!(e.to_string().contains("line-3") && e.to_string().contains("nosuchsource-xyz"), "{e}");
        assert!(check_pipeline(&bad).unwrap_err().contains("nosuchsource-xyz"));
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let closed =
            GstSettings { input: Input::Uri(format!("rtsp://127.0.0.1:{port}/x")), credentials: None, buffers: 2 };
        assert!(check_pipeline(&closed).is_ok());
        let mut source = GstSource::open(&closed, context("line-3", 1, 1 << 20, 20, stop)).unwrap();
        let e = source.next_frame().unwrap_err();
        assert!(matches!(e, CaptureError::Read { .. }), "{e}");
    }

    #[test]
    fn a_stop_ends_the_wait_for_a_frame() {
        let (mut source, stop) =
            open("videotestsrc is-live=true ! video/x-raw,width=8,height=8,framerate=1/100", 2, 1, 64);
        assert!(source.next_frame().is_ok(), "the first frame of a live source");
        drop(stop);
        assert!(matches!(source.next_frame(), Err(CaptureError::Stopped { .. })));
    }

    #[test]
    fn credentials_reach_the_elements_that_take_them_and_no_debug_output() {
        let s = GstSettings {
            input: Input::Pipeline("rtspsrc name=src location=rtsp://127.0.0.1:9/x ! decodebin".into()),
            credentials: Some(("inspector".into(), "s3cret".into())),
            buffers: 2,
        };
        gst::init().unwrap();
        let pipeline = gst::parse::launch(&s.description(1)).unwrap().downcast::<gst::Pipeline>().unwrap();
        lend_credentials(&pipeline, "inspector".into(), "s3cret".into());
        let src = pipeline.by_name("src").unwrap();
        assert_eq!(src.property::<String>("user-id"), "inspector");
        assert_eq!(src.property::<String>("user-pw"), "s3cret");
        let shown = format!("{s:?}");
        assert!(shown.contains("inspector") && !shown.contains("s3cret"), "{shown}");
    }
}
