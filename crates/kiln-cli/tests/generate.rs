//! `kiln generate` end to end on the 4-layer SmolLM2 that `models/fetch.sh --llm` builds under
//! `$KILN_MODELS/llm/` (SKIP without `KILN_MODELS`, failure with `KILN_MODELS_REQUIRED=1`).

use std::io::Read as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn llm_dir() -> Option<PathBuf> {
    kiln_llm::testing::model_dir(kiln_llm::testing::SMALL_MODEL)
}

fn kiln(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn generate_streams_an_answer_and_reports_timings() {
    let Some(dir) = llm_dir() else { return };
    let dir = dir.to_str().unwrap();
    let greedy = [
        "generate",
        dir,
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "5",
        "--temperature",
        "0",
        "--ignore-eos",
    ];
    let (ok, out, err) = kiln(&greedy);
    assert!(ok, "{err}");
    assert!(!out.trim().is_empty(), "{out:?}");
    assert!(err.contains("generated tokens: 5,"), "{err}");
    assert!(err.contains("finish reason: length"), "{err}");
    assert!(
        err.contains("time to first token: ") && err.contains("ms/token"),
        "{err}"
    );

    // Chat with a system message, sampled, with a stop string. `--level disabled` loads in a
    // quarter of the time in a debug build.
    let (ok, out, err) = kiln(&[
        "generate",
        dir,
        "--level",
        "disabled",
        "--chat",
        "--system",
        "You are terse.",
        "--prompt",
        "Name a colour.",
        "--max-tokens",
        "4",
        "--temperature",
        "0.8",
        "--seed",
        "7",
        "--top-k",
        "20",
        "--top-p",
        "0.9",
        "--stop",
        "\n\n",
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("prompt tokens: "), "{err}");
    assert!(!out.contains("\n\n"), "{out:?}");
}

#[test]
fn generate_errors_are_clear() {
    let (ok, _, err) = kiln(&["generate", "/nonexistent/model-dir", "--prompt", "hi"]);
    assert!(!ok);
    assert!(
        err.starts_with("error: /nonexistent/model-dir: no such model directory"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let empty = tempfile::tempdir().unwrap();
    let (ok, _, err) = kiln(&["generate", empty.path().to_str().unwrap(), "--prompt", "hi"]);
    assert!(
        !ok && err.contains("missing model.onnx, config.json (or genai_config.json), tokenizer.json"),
        "{err}"
    );

    let Some(dir) = llm_dir() else { return };
    let dir = dir.to_str().unwrap();
    for (args, want) in [
        (vec!["--temperature=-1"], "temperature"),
        (vec!["--top-p", "0"], "top_p"),
        (vec!["--top-k=-5"], "--top-k"),
        (vec!["--max-tokens", "0"], "--max-tokens"),
        (vec!["--max-model-len", "16", "--kv-cache-mb", "0"], "--kv-cache-mb"),
    ] {
        let mut all = vec!["generate", dir, "--prompt", "hi"];
        all.extend(args.iter().copied());
        let (ok, _, err) = kiln(&all);
        assert!(
            !ok && err.starts_with("error: ") && err.contains(want),
            "{args:?}: {err}"
        );
    }
    // --system needs --chat (a usage error from the argument parser).
    let (ok, _, err) = kiln(&["generate", dir, "--prompt", "hi", "--system", "x"]);
    assert!(!ok && err.contains("--chat"), "{err}");
}

/// A reader that goes away mid-answer ends the command quietly, as `kiln inspect | head` does.
#[test]
fn generate_into_a_closed_pipe_exits_quietly() {
    let Some(dir) = llm_dir() else { return };
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "generate",
            dir.to_str().unwrap(),
            "--prompt",
            "Once upon a time",
            "--level",
            "disabled",
            "--max-tokens",
            "64",
            "--ignore-eos",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read the first bytes of the answer, then close the pipe.
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 1];
    stdout.read_exact(&mut first).unwrap();
    drop(stdout);
    let status = child.wait().unwrap();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(status.success(), "{status:?}: {err}");
    assert!(!err.contains("panicked") && !err.contains("error"), "{err}");
}
