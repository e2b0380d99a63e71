//! GenICam cameras — GigE Vision and USB3 Vision machine-vision cameras — through Aravis
//! (the `aravis` crate: the maintained gir-generated binding of the library Debian packages;
//! no hand-written FFI).
//!
//! The source owns the camera's configuration (pixel format, exposure, gain, frame rate,
//! sensor region and any feature set by its GenICam name, applied in that order at every
//! open), its bounded pool of stream buffers (a frame that finds no free buffer is lost by
//! Aravis and counted here as `source_queue`), the conversion of Mono8/Mono16/RGB8/BGR8/
//! Bayer 8-bit buffers into images (Bayer debayered), and the camera's own trigger: with
//! `trigger_source` the camera exposes only when triggered (`Software`: by this source when
//! a trigger waits, `Line0`…: by the line). An incomplete frame (lost GVSP packets, a
//! timeout, a size mismatch) is `Incomplete`; a lost control channel or no frame within the
//! stall timeout is a `Read` error, and the capture thread reopens with backoff.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use aravis::prelude::*;
use aravis::{AcquisitionMode, Buffer, BufferPayloadType, BufferStatus, Camera, PixelFormat, Stream};
use crossbeam_channel::TryRecvError;
use image::{DynamicImage, GrayImage, RgbImage};

use super::{CameraStamp, CaptureError, FrameSource, StreamContext};

/// How long one wait for a buffer lasts before the source looks at its stop channel again.
const POLL: Duration = Duration::from_millis(200);

/// A feature value as the config gives it; the GenICam node's type must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Feature {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

/// A `[[cameras]]` table with `source = "genicam"`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct GenicamSettings {
    /// Device id, serial number or IP address; `None` opens the first camera found.
    pub device: Option<String>,
    /// A GenICam `PixelFormat` name (`Mono8`, `BayerRG8`, …).
    pub pixel_format: Option<String>,
    pub exposure_us: Option<f64>,
    pub gain_db: Option<f64>,
    pub frame_rate: Option<f64>,
    /// Sensor region `[x, y, width, height]`.
    pub region: Option<[u32; 4]>,
    /// Any other features, set by name in name order after the ones above.
    pub features: Vec<(String, Feature)>,
    /// `TriggerSource` with `TriggerMode=On` (frame start); `None`: free-running.
    pub trigger_source: Option<String>,
    /// Stream buffers in the pool.
    pub buffers: usize,
}

impl GenicamSettings {
    /// Whether this source exposes a frame when asked (`trigger_source = "Software"`).
    pub fn software_trigger(&self) -> bool {
        self.trigger_source.as_deref() == Some("Software")
    }
}

/// An open, streaming GenICam camera.
pub struct GenicamSource {
    context: StreamContext,
    camera: Camera,
    stream: Stream,
    /// Set by Aravis when the control channel is lost (the camera disappeared).
    lost: Arc<AtomicBool>,
    /// Aravis' underrun count already reported.
    reported: u64,
    /// The camera's number and time of the last buffer.
    last: CameraStamp,
}

impl GenicamSource {
    /// Opens `settings.device`, configures it and starts acquisition.
    pub fn open(settings: &GenicamSettings, context: StreamContext) -> Result<Self, CaptureError> {
        let id = context.camera.as_str();
        let device = settings.device.clone().unwrap_or_else(|| "the first camera found".into());
        let open_error = |reason: String| CaptureError::Open { camera: id.to_string(), device: device.clone(), reason };
        let camera = Camera::new(settings.device.as_deref()).map_err(|e| open_error(e.to_string()))?;
        configure(&camera, settings).map_err(open_error)?;
        let payload = camera.payload().map_err(|e| open_error(format!("payload size: {e}")))?;
        let stream = camera.create_stream().map_err(|e| open_error(format!("cannot open a stream: {e}")))?;
        for _ in 0..settings.buffers.max(1) {
            stream.push_buffer(Buffer::new_allocate(payload as usize));
        }
        let lost = Arc::new(AtomicBool::new(false));
        if let Some(control) = camera.device() {
            let flag = lost.clone();
            control.connect_control_lost(move |_| flag.store(true, Relaxed));
        }
        camera.set_acquisition_mode(AcquisitionMode::Continuous).map_err(|e| open_error(e.to_string()))?;
        camera.start_acquisition().map_err(|e| open_error(format!("cannot start acquisition: {e}")))?;
        let model = camera.model_name().map(|m| m.to_string()).unwrap_or_default();
        tracing::info!(camera = id, device = %device, model = %model, payload, "GenICam camera opened.");
        Ok(Self { context, camera, stream, lost, reported: 0, last: CameraStamp::default() })
    }

    fn read_error(&self, reason: String) -> CaptureError {
        CaptureError::Read { camera: self.context.camera.clone(), reason }
    }
}

/// `check-config` against the camera where it can be reached, changing nothing on it: the
/// pixel format is one the camera offers and every named feature exists. `Ok(false)`: the
/// camera is not reachable from here (checked offline only); `Err` lists what it refuses.
pub fn check_camera(settings: &GenicamSettings) -> Result<bool, Vec<String>> {
    let Ok(camera) = Camera::new(settings.device.as_deref()) else { return Ok(false) };
    let mut problems = Vec::new();
    if let Some(format) = &settings.pixel_format {
        let offered: Vec<String> = camera
            .dup_available_pixel_formats_as_strings()
            .map(|all| all.iter().map(|f| f.to_string()).collect())
            .unwrap_or_default();
        if !offered.contains(format) {
            problems.push(format!("pixel_format '{format}' is not one the camera offers ({})", offered.join(", ")));
        }
    }
    for (name, _) in &settings.features {
        if !camera.is_feature_available(name).unwrap_or(false) {
            problems.push(format!("features.{name}: the camera has no such feature"));
        }
    }
    if problems.is_empty() { Ok(true) } else { Err(problems) }
}

/// Applies the settings in a fixed order; an error names the feature and the value.
fn configure(camera: &Camera, s: &GenicamSettings) -> Result<(), String> {
    let named = |what: &str, value: String, r: Result<(), aravis::glib::Error>| {
        r.map_err(|e| format!("cannot set {what} to {value}: {e}"))
    };
    if let Some(format) = &s.pixel_format {
        named("PixelFormat", format.clone(), camera.set_pixel_format_from_string(format))?;
    }
    if let Some([x, y, w, h]) = s.region {
        let to_i32 = |v: u32| i32::try_from(v).unwrap_or(i32::MAX);
        named("the region", format!("{:?}", s.region), camera.set_region(to_i32(x), to_i32(y), to_i32(w), to_i32(h)))?;
    }
    if let Some(us) = s.exposure_us {
        named("ExposureTime", format!("{us} µs"), camera.set_exposure_time(us))?;
    }
    if let Some(db) = s.gain_db {
        named("Gain", format!("{db} dB"), camera.set_gain(db))?;
    }
    if let Some(fps) = s.frame_rate {
        named("AcquisitionFrameRate", format!("{fps}"), camera.set_frame_rate(fps))?;
    }
    for (name, value) in &s.features {
        let result = match value {
            Feature::Bool(b) => camera.set_boolean(name, *b),
            Feature::Int(i) => camera.set_integer(name, *i),
            Feature::Float(f) => camera.set_float(name, *f),
            Feature::Text(t) => camera.set_string(name, t),
        };
        named(name, format!("{value:?}"), result)?;
    }
    match &s.trigger_source {
        Some(source) => named("the trigger source", source.clone(), camera.set_trigger(source)),
        None => named("the triggers", "off".into(), camera.clear_triggers()),
    }
}

impl FrameSource for GenicamSource {
    fn camera(&self) -> &str {
        &self.context.camera
    }

    fn next_frame(&mut self) -> Result<DynamicImage, CaptureError> {
        let c = &self.context;
        let deadline = Instant::now() + c.stall;
        loop {
            if c.stop.try_recv() == Err(TryRecvError::Disconnected) {
                return Err(CaptureError::Stopped { camera: c.camera.clone() });
            }
            if self.lost.load(Relaxed) {
                return Err(self.read_error("the camera's control channel is lost".into()));
            }
            if let Some(buffer) = self.stream.timeout_pop_buffer(POLL.as_micros() as u64) {
                let timestamp = buffer.timestamp();
                self.last = CameraStamp {
                    frame_id: Some(buffer.frame_id()),
                    timestamp_ns: (timestamp > 0).then_some(timestamp),
                };
                let frame = to_image(&c.camera, &buffer, c.channels, c.max_pixels);
                self.stream.push_buffer(buffer); // back to the pool
                return frame;
            }
            if Instant::now() >= deadline {
                return Err(self.read_error(format!("no frame for {:.1} s", c.stall.as_secs_f64())));
            }
        }
    }

    fn take_dropped(&mut self) -> u64 {
        let (_, _, underruns) = self.stream.statistics();
        let new = underruns.saturating_sub(self.reported);
        self.reported = underruns;
        new
    }

    fn fire(&mut self) -> Result<(), CaptureError> {
        self.camera.software_trigger().map_err(|e| self.read_error(format!("software trigger: {e}")))
    }

    fn stamp(&self) -> CameraStamp {
        self.last
    }
}

impl Drop for GenicamSource {
    fn drop(&mut self) {
        if let Err(e) = self.camera.stop_acquisition() {
            tracing::warn!(camera = %self.context.camera, error = %e, "GenICam acquisition did not stop cleanly.");
        }
    }
}

/// A completed buffer as an image in the model's channels; anything else is an error.
fn to_image(camera: &str, buffer: &Buffer, channels: usize, max_pixels: u64) -> Result<DynamicImage, CaptureError> {
    let status = buffer.status();
    if status != BufferStatus::Success {
        return Err(CaptureError::Incomplete { camera: camera.to_string(), status: format!("{status:?}") });
    }
    let (width, height) = (buffer.image_width().max(0) as u32, buffer.image_height().max(0) as u32);
    let format = buffer.image_pixel_format();
    let decode_error = |bytes: usize, reason: String| CaptureError::Decode {
        camera: camera.to_string(),
        format: format!("GenICam pixel format 0x{:08x}", format.raw()),
        width,
        height,
        bytes,
        reason,
    };
    if buffer.payload_type() != BufferPayloadType::Image {
        return Err(decode_error(0, format!("payload {:?}, not an image", buffer.payload_type())));
    }
    if u64::from(width) * u64::from(height) > max_pixels {
        let what = format!("{format:?}");
        return Err(CaptureError::TooLarge { camera: camera.to_string(), what, width, height, limit: max_pixels });
    }
    let data = buffer.image_data();
    let pixels = width as usize * height as usize;
    let need = |bytes_per_pixel: usize| {
        if data.len() < pixels * bytes_per_pixel {
            Err(decode_error(data.len(), format!("expected {} bytes", pixels * bytes_per_pixel)))
        } else {
            Ok(())
        }
    };
    let image = match format {
        PixelFormat::MONO_8 => {
            need(1)?;
            DynamicImage::ImageLuma8(GrayImage::from_raw(width, height, data[..pixels].to_vec()).expect("sized"))
        }
        PixelFormat::MONO_16 => {
            need(2)?;
            // Little-endian 16-bit: the high byte is the 8-bit value.
            let grey = data.chunks_exact(2).take(pixels).map(|p| p[1]).collect();
            DynamicImage::ImageLuma8(GrayImage::from_raw(width, height, grey).expect("sized"))
        }
        PixelFormat::RGB_8_PACKED | PixelFormat::BGR_8_PACKED => {
            need(3)?;
            let mut rgb = data[..pixels * 3].to_vec();
            if format == PixelFormat::BGR_8_PACKED {
                rgb.chunks_exact_mut(3).for_each(|p| p.swap(0, 2));
            }
            DynamicImage::ImageRgb8(RgbImage::from_raw(width, height, rgb).expect("sized"))
        }
        bayer if cfa(bayer).is_some() => {
            need(1)?;
            debayer(width, height, cfa(bayer).expect("matched"), &data[..pixels])
                .map_err(|e| decode_error(data.len(), e))?
        }
        _ => return Err(decode_error(data.len(), "not one of Mono8, Mono16, RGB8, BGR8, Bayer*8".into())),
    };
    Ok(if channels == 1 { DynamicImage::ImageLuma8(image.to_luma8()) } else { image })
}

/// The colour filter of an 8-bit Bayer format.
fn cfa(format: PixelFormat) -> Option<bayer::CFA> {
    match format {
        PixelFormat::BAYER_BG_8 => Some(bayer::CFA::BGGR),
        PixelFormat::BAYER_GB_8 => Some(bayer::CFA::GBRG),
        PixelFormat::BAYER_GR_8 => Some(bayer::CFA::GRBG),
        PixelFormat::BAYER_RG_8 => Some(bayer::CFA::RGGB),
        _ => None,
    }
}

/// Bilinear demosaicing (the `bayer` crate) into RGB.
fn debayer(width: u32, height: u32, filter: bayer::CFA, mut raw: &[u8]) -> Result<DynamicImage, String> {
    let mut rgb = vec![0u8; width as usize * height as usize * 3];
    let mut dest = bayer::RasterMut::new(width as usize, height as usize, bayer::RasterDepth::Depth8, &mut rgb);
    bayer::run_demosaic(&mut raw, bayer::BayerDepth::Depth8, filter, bayer::Demosaic::Linear, &mut dest)
        .map_err(|e| format!("demosaicing: {e:?}"))?;
    Ok(DynamicImage::ImageRgb8(RgbImage::from_raw(width, height, rgb).expect("sized")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::Receiver;
    use std::process::{Child, Command};

    /// The one loopback address the fake camera listens on (it takes an interface's own
    /// address): its tests take turns.
    const ADDRESS: &str = "127.0.0.1";
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// `arv-fake-gv-camera-0.8` (Debian's aravis-tools) serving GigE Vision on loopback;
    /// killed by PID when dropped. Holds the turn while it runs.
    struct FakeCamera(Child, #[allow(dead_code)] std::sync::MutexGuard<'static, ()>);

    impl FakeCamera {
        fn start() -> Self {
            let turn = TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let child = Command::new("arv-fake-gv-camera-0.8")
                .args(["-i", ADDRESS, "-s", "EI-TEST"])
                .spawn()
                .expect("arv-fake-gv-camera-0.8 (scripts/setup.sh installs aravis-tools)");
            Self(child, turn)
        }
    }

    impl Drop for FakeCamera {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn settings(address: &str) -> GenicamSettings {
        GenicamSettings {
            device: Some(address.into()),
            pixel_format: Some("Mono8".into()),
            exposure_us: Some(2500.0),
            gain_db: Some(3.0),
            frame_rate: Some(20.0),
            region: Some([0, 0, 320, 240]),
            features: vec![],
            trigger_source: None,
            buffers: 4,
        }
    }

    fn context(stop: Receiver<()>) -> StreamContext {
        StreamContext { camera: "gige".into(), channels: 1, max_pixels: 1 << 22, stall: Duration::from_secs(5), stop }
    }

    /// Repeats `attempt` until `done` accepts its outcome or 10 s pass: the fake camera is
    /// a process of its own and answers only once it listens (it signals nothing sooner).
    fn until_listening<T>(mut attempt: impl FnMut() -> T, done: impl Fn(&T) -> bool) -> T {
        let started = Instant::now();
        loop {
            let outcome = attempt();
            if done(&outcome) || started.elapsed() > Duration::from_secs(10) {
                return outcome;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Opens the fake camera once it listens.
    fn open(address: &str, s: &GenicamSettings, stop: Receiver<()>) -> GenicamSource {
        until_listening(|| GenicamSource::open(s, context(stop.clone())), Result::is_ok)
            .unwrap_or_else(|e| panic!("{address}: {e}"))
    }

    #[test]
    fn a_gige_camera_streams_with_its_features_set_and_a_lost_camera_is_a_read_error() {
        let address = ADDRESS;
        let fake = FakeCamera::start();
        let (stop_tx, stop) = crossbeam_channel::bounded::<()>(0);
        let mut s = settings(address);
        s.features = vec![("GevSCPSPacketSize".into(), Feature::Int(1400))];
        let mut source = open(address, &s, stop.clone());
        assert_eq!(source.camera.exposure_time().unwrap(), 2500.0);
        assert_eq!(source.camera.integer("GevSCPSPacketSize").unwrap(), 1400);
        for _ in 0..3 {
            let frame = source.next_frame().unwrap();
            assert_eq!((frame.width(), frame.height()), (320, 240));
            assert!(matches!(frame, DynamicImage::ImageLuma8(_)));
        }
        drop(fake);
        let e = source.next_frame().unwrap_err();
        assert!(matches!(e, CaptureError::Read { .. }), "{e}");
        drop(stop_tx);
    }

    #[test]
    fn a_software_triggered_camera_delivers_a_frame_per_trigger_and_nothing_between() {
        let address = ADDRESS;
        let _fake = FakeCamera::start();
        let (_stop_tx, stop) = crossbeam_channel::bounded::<()>(0);
        let mut s = settings(address);
        s.trigger_source = Some("Software".into());
        let mut source = open(address, &s, stop);
        source.context.stall = Duration::from_millis(800);
        assert!(matches!(source.next_frame(), Err(CaptureError::Read { .. })), "no frame without a trigger");
        source.fire().unwrap();
        assert_eq!(source.next_frame().unwrap().width(), 320);
    }

    #[test]
    fn the_camera_numbers_and_times_its_frames() {
        let address = ADDRESS;
        let _fake = FakeCamera::start();
        let (_stop_tx, stop) = crossbeam_channel::bounded::<()>(0);
        let mut source = open(address, &settings(address), stop);
        let mut stamps = Vec::new();
        for _ in 0..3 {
            source.next_frame().unwrap();
            stamps.push(source.stamp());
        }
        let ids: Vec<u64> = stamps.iter().map(|s| s.frame_id.unwrap()).collect();
        assert!(ids.windows(2).all(|w| w[1] > w[0]), "{stamps:?}");
        let times: Vec<u64> = stamps.iter().map(|s| s.timestamp_ns.unwrap()).collect();
        assert!(times.windows(2).all(|w| w[1] > w[0]), "{stamps:?}");
    }

    #[test]
    fn a_bad_feature_value_names_the_feature_and_no_camera_names_the_device() {
        let address = ADDRESS;
        let _fake = FakeCamera::start();
        let (_stop_tx, stop) = crossbeam_channel::bounded::<()>(0);
        let mut s = settings(address);
        s.features = vec![("NoSuchFeature".into(), Feature::Int(1))];
        let e = until_listening(
            || GenicamSource::open(&s, context(stop.clone())).err().unwrap(),
            |e| e.to_string().contains("NoSuchFeature"),
        );
        assert!(e.to_string().contains("gige") && e.to_string().contains("NoSuchFeature"), "{e}");
        // check-config against the reachable camera: the same feature is named, nothing set.
        let problems = check_camera(&s).unwrap_err();
        assert_eq!(problems, ["features.NoSuchFeature: the camera has no such feature"]);
        s.features = vec![("GevSCPSPacketSize".into(), Feature::Int(1400))];
        s.pixel_format = Some("Mono8".into());
        assert_eq!(check_camera(&s), Ok(true));
        s.pixel_format = Some("BayerXY99".into());
        assert!(check_camera(&s).unwrap_err()[0].starts_with("pixel_format 'BayerXY99' is not one"));
        let nobody = settings("EI-NO-SUCH-CAMERA");
        assert_eq!(check_camera(&nobody), Ok(false), "unreachable: checked offline only");
        let e = GenicamSource::open(&nobody, context(stop)).err().unwrap();
        assert!(e.to_string().contains("EI-NO-SUCH-CAMERA"), "{e}");
    }
}
