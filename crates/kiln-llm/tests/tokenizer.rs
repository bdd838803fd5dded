//! The tokenizer, chat template and streaming detokenizer against independent ground truth.
//!
//! - Token ids and decode: llama.cpp's own tokenizer on the 45-string corpus
//!   (`tests/llm/tokenizer_expected.json`, written by `models/llm/check_tokenizer.py --regenerate`
//!   with `add_bos=False, special=True`).
//! - Chat templates: the strings Python's jinja2 renders with transformers' settings
//!   (`ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])`,
//!   its `tojson` and `raise_exception`), pasted below.
//!
//! Model files: the 4-layer SmolLM2 built by `models/fetch.sh --llm` under `$KILN_MODELS/llm/`.
//! Without `KILN_MODELS` the tests that need them print SKIP and pass; with `KILN_MODELS_REQUIRED=1`
//! they fail instead.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_llm::{ChatMessage, ChatTemplate, IncrementalDecoder, LlmTokenizer, SpecialTokens, TokenizerError};
use serde_json::Value;

fn model_dir() -> Option<PathBuf> {
    kiln_llm::testing::model_dir(kiln_llm::testing::SMALL_MODEL)
}

fn tokenizer() -> Option<LlmTokenizer> {
    model_dir().map(|d| LlmTokenizer::from_dir(&d).expect("load the SmolLM2 tokenizer"))
}

struct Case {
    text: String,
    ids: Vec<u32>,
    decoded: String,
}

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(rel)
}

fn cases() -> Vec<Case> {
    let read = |rel: &str| -> Value {
        let text = std::fs::read_to_string(repo_file(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{rel}: {e}"))
    };
    let corpus = read("tests/llm/tokenizer_corpus.json");
    let expected = read("tests/llm/tokenizer_expected.json");
    let cases: Vec<Case> = expected["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| Case {
            text: c["text"].as_str().expect("text").to_string(),
            ids: c["ids"]
                .as_array()
                .expect("ids")
                .iter()
                .map(|i| i.as_u64().expect("id") as u32)
                .collect(),
            decoded: c["decoded"].as_str().expect("decoded").to_string(),
        })
        .collect();
    let corpus: Vec<&str> = corpus
        .as_array()
        .expect("corpus")
        .iter()
        .map(|s| s.as_str().expect("string"))
        .collect();
    assert_eq!(
        cases.iter().map(|c| c.text.as_str()).collect::<Vec<_>>(),
        corpus,
        "tokenizer_expected.json is not for tokenizer_corpus.json"
    );
    assert!(cases.len() >= 45);
    cases
}

#[test]
fn tokenizer_is_send_sync() {
    fn check<T: Send + Sync>() {}
    check::<LlmTokenizer>();
    check::<Arc<LlmTokenizer>>();
    check::<IncrementalDecoder>();
}

#[test]
fn corpus_encodes_and_decodes_as_llama_cpp() {
    let Some(tok) = tokenizer() else { return };
    let cases = cases();
    let mut bad = Vec::new();
    for (n, c) in cases.iter().enumerate() {
        let ids = tok.encode(&c.text, false).unwrap();
        if ids != c.ids {
            bad.push(format!(
                "case {n} {:?}: ids\n  llama.cpp {:?}\n  ours      {ids:?}",
                c.text, c.ids
            ));
        }
        // SmolLM2 has no post-processor (llama.cpp: add_bos false), so add_special_tokens adds nothing.
        assert_eq!(tok.encode(&c.text, true).unwrap(), ids, "case {n}");
        let decoded = tok.decode(&c.ids, false).unwrap();
        if decoded != c.decoded {
            bad.push(format!(
                "case {n}: decode\n  llama.cpp {:?}\n  ours      {decoded:?}",
                c.decoded
            ));
        }
    }
    assert!(bad.is_empty(), "{} mismatches:\n{}", bad.len(), bad.join("\n"));
    eprintln!("{} corpus strings: ids and decode equal llama.cpp's", cases.len());
}

#[test]
fn special_tokens_and_vocab() {
    let Some(tok) = tokenizer() else { return };
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos_token(), Some("<|im_start|>"));
    assert_eq!(tok.eos_token(), Some("<|im_end|>"));
    assert_eq!(tok.bos_token_id(), Some(1));
    assert_eq!(tok.eos_token_id(), Some(2));
    assert_eq!(tok.eos_token_ids(), &[2, 0]);
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(tok.id_to_token(2).as_deref(), Some("<|im_end|>"));
    assert_eq!(tok.id_to_token(905).as_deref(), Some("Ġworld"));
    assert_eq!(tok.token_to_id("no such token"), None);
    assert_eq!(tok.id_to_token(49152), None);
    assert!(tok.is_special(0) && tok.is_special(16) && !tok.is_special(17));
    // Special tokens written in the text are specials; skip_special_tokens drops them.
    let ids = tok.encode("a<|im_end|>b", false).unwrap();
    assert_eq!(ids, [81, 2, 82]);
    assert_eq!(tok.decode(&ids, true).unwrap(), "ab");
}

#[test]
fn bad_input_is_a_typed_error() {
    let Some(tok) = tokenizer() else { return };
    match tok.decode(&[19556, 49152], false) {
        Err(TokenizerError::UnknownId {
            id: 49152,
            vocab_size: 49152,
        }) => {}
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        tok.decode(&[u32::MAX], true),
        Err(TokenizerError::UnknownId { .. })
    ));
    let mut d = IncrementalDecoder::new(Arc::new(tok), false);
    assert!(matches!(d.push(1 << 30), Err(TokenizerError::UnknownId { .. })));
    assert_eq!(d.push(19556).unwrap(), "Hello");
    assert_eq!(d.ids(), &[19556]);
}

#[test]
fn bad_files_are_typed_errors() {
    let dir = std::env::temp_dir().join(format!("kiln-tokenizer-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    assert!(matches!(LlmTokenizer::from_dir(&dir), Err(TokenizerError::Io { .. })));
    std::fs::write(dir.join("tokenizer.json"), "{\"model\": 42}").unwrap();
    assert!(matches!(LlmTokenizer::from_dir(&dir), Err(TokenizerError::Load { .. })));
    if let Some(model) = model_dir() {
        std::fs::copy(model.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
        std::fs::write(dir.join("tokenizer_config.json"), "{\"chat_template\": \"{% if %}\"}").unwrap();
        assert!(matches!(
            LlmTokenizer::from_dir(&dir),
            Err(TokenizerError::TemplateSyntax(_))
        ));
        std::fs::write(dir.join("tokenizer_config.json"), "{\"eos_token\": 3}").unwrap();
        assert!(matches!(
            LlmTokenizer::from_dir(&dir),
            Err(TokenizerError::Config { field: "eos_token", .. })
        ));
        std::fs::write(dir.join("tokenizer_config.json"), "not json").unwrap();
        assert!(matches!(
            LlmTokenizer::from_dir(&dir),
            Err(TokenizerError::ConfigJson { .. })
        ));
        // No config at all: a tokenizer without template or special-token strings.
        std::fs::remove_file(dir.join("tokenizer_config.json")).unwrap();
        let tok = LlmTokenizer::from_dir(&dir).unwrap();
        assert_eq!(
            (tok.chat_template(), tok.eos_token(), tok.eos_token_ids()),
            (None, None, &[][..])
        );
        assert!(matches!(
            tok.apply_chat_template(&[ChatMessage::new("user", "hi")], true),
            Err(TokenizerError::NoChatTemplate)
        ));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn system_user() -> Vec<ChatMessage> {
    vec![
        ChatMessage::new("system", "You are a terse assistant."),
        ChatMessage::new("user", "What is the capital of France?"),
    ]
}

#[test]
fn chat_template_renders_as_jinja2() {
    let Some(tok) = tokenizer() else { return };
    assert!(tok.chat_template().unwrap().contains("<|im_start|>"));
    // Python jinja2 with transformers' environment, same template and messages.
    assert_eq!(
        tok.apply_chat_template(&system_user(), true).unwrap(),
        "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n<|im_start|>user\nWhat is the capital of \
         France?<|im_end|>\n<|im_start|>assistant\n"
    );
    let conv = [
        ChatMessage::new("user", "Hi"),
        ChatMessage::new("assistant", "Hello! ✓"),
        ChatMessage::new("user", "2+2?"),
    ];
    assert_eq!(
        tok.apply_chat_template(&conv, false).unwrap(),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello! ✓<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
    );
    // Without a system message the template adds its default one; that prompt is a corpus string,
    // so its ids are llama.cpp's.
    let prompt = tok
        .apply_chat_template(&[ChatMessage::new("user", "What is the capital of France?")], true)
        .unwrap();
    let case = cases()
        .into_iter()
        .find(|c| c.text == prompt)
        .expect("the chat prompt is in the corpus");
    assert_eq!(tok.encode(&prompt, false).unwrap(), case.ids);
}

#[test]
fn chat_template_override_and_raise_exception() {
    let Some(mut tok) = tokenizer() else { return };
    let original = tok.chat_template().unwrap().to_string();
    assert!(matches!(
        tok.set_chat_template("{% for m in messages %}".into()),
        Err(TokenizerError::TemplateSyntax(_))
    ));
    assert_eq!(
        tok.chat_template(),
        Some(original.as_str()),
        "a failed override keeps the template"
    );
    tok.set_chat_template(
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}\
         {% for m in messages %}{{ bos_token + m['content'] + eos_token }}{% endfor %}"
            .into(),
    )
    .unwrap();
    match tok.apply_chat_template(&system_user(), true) {
        Err(TokenizerError::TemplateException(m)) => assert_eq!(m, "System role not supported"),
        other => panic!("expected TemplateException, got {other:?}"),
    }
    assert_eq!(
        tok.apply_chat_template(&system_user()[1..], true).unwrap(),
        "<|im_start|>What is the capital of France?<|im_end|>"
    );
}

/// trim_blocks, lstrip_blocks, loop controls, Python string methods and transformers' tojson; the
/// expected string is what Python's jinja2 renders (no model files needed).
#[test]
fn template_features_match_jinja2() {
    let src = "{{ bos_token }}\n{% for m in messages %}\n    {% if m.role == 'system' %}\n        {% continue %}\n    \
               {% endif %}\n    [{{ m.role.upper() }}] {{ m.content.strip() | tojson }} {{ m | tojson }}\n    {% if \
               m.content.startswith('stop') %}{% break %}{% endif %}\n{% endfor %}\n{% if add_generation_prompt %}\n\
               [ASSISTANT]\n{% endif %}\n";
    let t = ChatTemplate::new(src.to_string()).unwrap();
    let messages = [
        ChatMessage::new("system", "sys"),
        ChatMessage::new("user", "  a \"q\" <b> é\n "),
        ChatMessage::new("assistant", "stop here"),
        ChatMessage::new("user", "never"),
    ];
    let special = SpecialTokens {
        bos_token: Some("<|im_start|>".into()),
        ..SpecialTokens::default()
    };
    assert_eq!(
        t.render(&messages, true, &special).unwrap(),
        "<|im_start|>\n    [USER] \"a \\\"q\\\" <b> é\" {\"role\": \"user\", \"content\": \"  a \\\"q\\\" <b> é\\n \"}\n    \
         [ASSISTANT] \"stop here\" {\"role\": \"assistant\", \"content\": \"stop here\"}\n[ASSISTANT]\n"
    );
}

#[test]
fn incremental_decoder_streams_the_corpus() {
    let Some(tok) = tokenizer() else { return };
    let tok = Arc::new(tok);
    let cases = cases();
    for (n, c) in cases.iter().enumerate() {
        for skip in [false, true] {
            let mut d = IncrementalDecoder::new(tok.clone(), skip);
            let mut out = String::new();
            for &id in &c.ids {
                let delta = d.push(id).unwrap();
                assert!(
                    !delta.contains('\u{FFFD}'),
                    "case {n} {:?}: delta {delta:?} at id {id} has U+FFFD",
                    c.text
                );
                out.push_str(&delta);
            }
            out.push_str(&d.finish());
            let full = if skip {
                tok.decode(&c.ids, true).unwrap()
            } else {
                c.decoded.clone()
            };
            assert_eq!(out, full, "case {n} skip_special_tokens={skip}");
        }
    }
}

#[test]
fn incremental_decoder_holds_a_cut_character() {
    let Some(tok) = tokenizer() else { return };
    let tok = Arc::new(tok);
    // "🎉" is several byte tokens: nothing comes out until the last one.
    let ids = tok.encode("🎉!", false).unwrap();
    assert!(ids.len() >= 3, "{ids:?}");
    let mut d = IncrementalDecoder::new(tok.clone(), false);
    let deltas: Vec<String> = ids.iter().map(|&id| d.push(id).unwrap()).collect();
    assert!(deltas[..ids.len() - 2].iter().all(String::is_empty), "{deltas:?}");
    assert_eq!(deltas.concat(), "🎉!");
    // finish() releases a character that never completed, as U+FFFD.
    let mut d = IncrementalDecoder::new(tok.clone(), false);
    assert_eq!(d.push(ids[0]).unwrap(), "");
    assert_eq!(d.finish(), "\u{FFFD}");
    assert_eq!(d.finish(), "");
    // Context ids are not emitted; the first generated token keeps its leading space.
    let ctx = tok.encode("Hello", false).unwrap();
    let mut d = IncrementalDecoder::with_context(tok.clone(), false, &ctx);
    assert_eq!(d.push(905).unwrap(), " world");
}
