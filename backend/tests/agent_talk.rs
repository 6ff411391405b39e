//! The device agent's `talk --wav` against the real server: espeak-ng speaks a question to a
//! WAV file, the agent streams it over MQTT+TLS or MQTT over WebSocket+TLS, the server's
//! offline voice (pocketsphinx, the persona's scripted reply, espeak-ng) answers, and the
//! agent writes a non-silent reply.

mod common;
mod voice_fake;

use std::process::Stdio;
use std::time::Duration;

use common::app::{DbKind, TestApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_talk_tool_gets_a_spoken_reply_from_the_real_server() {
    talk_over(|app| format!("mqtts://localhost:{}", app.mqtts.port())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_talk_tool_works_over_wss() {
    talk_over(|app| format!("wss://localhost:{}/mqtt", app.wss.port())).await;
}

async fn talk_over(url: fn(&TestApp) -> String) {
    let agent = common::ops::agent_binary().await;
    let app = TestApp::start(DbKind::Sqlite).await.unwrap();
    let (id, token) = app.register("talker").await;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("question.wav");
    let reply = dir.path().join("reply.wav");
    // The agent takes 16 kHz mono 16-bit, like its microphone.
    let pcm = voice_fake::spoken("what is the weather like today");
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 16_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(&input, spec).unwrap();
    for s in pcm.iter().chain(std::iter::repeat_n(&0i16, 8_000)) {
        w.write_sample(*s).unwrap();
    }
    w.finalize().unwrap();
    let env = dir.path().join("agent.env");
    std::fs::write(
        &env,
        format!(
            "DEVICE_ID={id}\nDEVICE_AUTH_TOKEN={token}\nCONTROL_PLANE_URL={}\nCA_CERT={}\nCACHE_DIR={}\n",
            url(&app),
            app.ca_pem.display(),
            dir.path().join("cache").display()
        ),
    )
    .unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new(agent)
            .env_clear()
            .env("RUST_LOG", "warn")
            .arg("--env-file")
            .arg(&env)
            .arg("talk")
            .arg("--wav")
            .arg(&input)
            .arg("--out")
            .arg(&reply)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("talk finishes in time")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stdout.to_lowercase().contains("weather"),
        "the transcript is printed: {stdout}"
    );
    assert!(stdout.contains("reply: "), "{stdout}");
    assert!(
        !stdout.contains(&token) && !stderr.contains(&token),
        "the token is never printed"
    );

    let samples: Vec<i16> = hound::WavReader::open(&reply)
        .unwrap()
        .into_samples::<i16>()
        .map(Result::unwrap)
        .collect();
    assert!(samples.len() > 8_000, "at least half a second of reply");
    let rms =
        (samples.iter().map(|s| f64::from(*s).powi(2)).sum::<f64>() / samples.len() as f64).sqrt();
    assert!(rms > 300.0, "the reply is not silent (rms {rms})");
    app.stop().await;
}
