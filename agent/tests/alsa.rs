//! The ALSA capture and playback code against ALSA's `null` device and `file` PCMs defined in
//! a configuration this test writes (`ALSA_CONFIG_PATH`). `null` has no clock, so nothing here
//! depends on pacing. One test function: the variable is process-wide.

use std::sync::atomic::AtomicU8;
use std::sync::Arc;

use companion_agent::audio::alsa::{AlsaIn, AlsaOut};
use companion_agent::audio::codec::Encoder;
use companion_agent::audio::{start_capture, start_playback};
use companion_agent::hw::{AudioIn, FRAME_SAMPLES};

fn tone(n: usize) -> Vec<i16> {
    (0..n)
        .map(|i| (7000.0 * (2.0 * std::f32::consts::PI * 400.0 * i as f32 / 16e3).sin()) as i16)
        .collect()
}

#[test]
fn alsa_capture_and_playback_run_against_null_and_file_devices() {
    let dir = tempfile::tempdir().unwrap();
    let out_raw = dir.path().join("out.raw");
    let in_raw = dir.path().join("in.raw");
    let conf = dir.path().join("asound.conf");
    std::fs::write(
        &conf,
        format!(
            r#"
pcm.null {{ type null }}
pcm.tapout {{
    type file
    slave.pcm "null"
    file "{out}"
    format "raw"
}}
pcm.tapin {{
    type file
    slave.pcm "null"
    file "/dev/null"
    infile "{inp}"
    format "raw"
}}
"#,
            out = out_raw.display(),
            inp = in_raw.display()
        ),
    )
    .unwrap();
    std::env::set_var("ALSA_CONFIG_PATH", &conf);

    // Capture from `null`: frames as fast as we read (their content is unspecified).
    let mut src = AlsaIn {
        device: "null".into(),
    }
    .open()
    .expect("null capture opens");
    let mut frame = [1i16; FRAME_SAMPLES];
    for _ in 0..5 {
        assert!(src.read_frame(&mut frame).unwrap());
    }
    drop(src);

    // Capture through a `file` PCM: the samples come from in.raw.
    let input = tone(FRAME_SAMPLES * 10);
    let bytes: Vec<u8> = input.iter().flat_map(|s| s.to_le_bytes()).collect();
    std::fs::write(&in_raw, bytes).unwrap();
    let mut src = AlsaIn {
        device: "tapin".into(),
    }
    .open()
    .expect("file capture opens");
    let mut got = Vec::new();
    for _ in 0..3 {
        assert!(src.read_frame(&mut frame).unwrap());
        got.extend_from_slice(&frame);
    }
    assert_eq!(&got[..], &input[..got.len()]);
    drop(src);

    // The capture thread encodes what ALSA delivers.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut cap = start_capture(
            &AlsaIn {
                device: "null".into(),
            },
            24_000,
        )
        .unwrap();
        for _ in 0..5 {
            let pkt = cap.frames.recv().await.expect("an Opus frame");
            assert!(!pkt.is_empty() && pkt.len() < 200);
        }
        cap.stop();
    });

    // Playback through a `file` PCM: the playback thread decodes and writes every frame.
    let mut enc = Encoder::new(24_000).unwrap();
    let pcm = tone(FRAME_SAMPLES * 12);
    let frames: Vec<Vec<u8>> = pcm
        .chunks(FRAME_SAMPLES)
        .map(|c| enc.encode(c.try_into().unwrap()).unwrap())
        .collect();
    let volume = Arc::new(AtomicU8::new(100));
    let mut playback = start_playback(
        &AlsaOut {
            device: "tapout".into(),
        },
        volume,
    )
    .unwrap();
    for (seq, chunk) in frames.chunks(3).enumerate() {
        assert!(playback.push(seq as u32, chunk.to_vec(), seq == 3));
    }
    let report = playback.join();
    assert_eq!(report.frames_played, 12);
    assert!(!report.cancelled);
    let written = std::fs::read(&out_raw).unwrap();
    assert_eq!(written.len(), 12 * FRAME_SAMPLES * 2);
    let samples: Vec<i16> = written
        .chunks(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect();
    let rms = (samples[FRAME_SAMPLES * 4..]
        .iter()
        .map(|s| (*s as f64).powi(2))
        .sum::<f64>()
        / (samples.len() - FRAME_SAMPLES * 4) as f64)
        .sqrt();
    assert!(rms > 2000.0, "decoded audio reached the device (rms {rms})");

    // A cancelled playback stops without playing the rest.
    let mut playback = start_playback(
        &AlsaOut {
            device: "null".into(),
        },
        Arc::new(AtomicU8::new(100)),
    )
    .unwrap();
    playback.cancel();
    assert!(!playback.push(0, frames.clone(), false));
    let report = playback.join();
    assert!(report.cancelled);
    assert_eq!(report.frames_played, 0);
}
