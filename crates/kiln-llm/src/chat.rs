//! Chat templates: a conversation to prompt text, rendered the way Hugging Face transformers does.
//!
//! transformers renders `chat_template` with Jinja2's `ImmutableSandboxedEnvironment(trim_blocks=True,
//! lstrip_blocks=True, extensions=[loopcontrols])`, the globals `raise_exception` and `strftime_now`,
//! its own `tojson` filter (no HTML escaping, Python's `json.dumps` layout), and the variables
//! `messages`, `add_generation_prompt` and the special-token strings (`bos_token`, `eos_token`,
//! `unk_token`, `pad_token`; an absent one is undefined, so it renders as nothing). Here the same
//! with `minijinja`, plus minijinja-contrib's Python string and dict methods (`.strip()`,
//! `.startswith()`, `.items()`, ...), as TGI and mistral.rs do.

use std::collections::BTreeMap;
use std::fmt;

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value};

use crate::tokenizer::TokenizerError;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The special-token strings a template sees as variables; `None` leaves the variable undefined.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub pad_token: Option<String>,
}

const NAME: &str = "chat_template";

/// A compiled chat template. `Send + Sync`.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// What `raise_exception(message)` raised, kept as the source of minijinja's error so the render
/// error can be told apart from a template bug.
#[derive(Debug)]
struct RaisedException(String);

impl fmt::Display for RaisedException {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedException {}

impl ChatTemplate {
    /// Compiles `source`; a syntax error is [`TokenizerError::TemplateSyntax`].
    pub fn new(source: String) -> Result<Self, TokenizerError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.clone())
            .map_err(|e| TokenizerError::TemplateSyntax(error_chain(&e)))?;
        Ok(ChatTemplate { env, source })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages`; `add_generation_prompt` asks the template to open the assistant's turn.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        special: &SpecialTokens,
    ) -> Result<String, TokenizerError> {
        let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
        ctx.insert("messages", Value::from_serialize(messages));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        for (name, v) in [
            ("bos_token", &special.bos_token),
            ("eos_token", &special.eos_token),
            ("unk_token", &special.unk_token),
            ("pad_token", &special.pad_token),
        ] {
            if let Some(s) = v {
                ctx.insert(name, Value::from(s.as_str()));
            }
        }
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| TokenizerError::TemplateRender(error_chain(&e)))?;
        tmpl.render(ctx).map_err(|e| {
            let mut src: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(s) = src {
                if let Some(r) = s.downcast_ref::<RaisedException>() {
                    return TokenizerError::TemplateException(r.0.clone());
                }
                src = s.source();
            }
            TokenizerError::TemplateRender(error_chain(&e))
        })
    }
}

/// minijinja's message with its location, then the messages of its sources.
fn error_chain(e: &Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, "raise_exception() was called").with_source(RaisedException(message)))
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent, separators=separators,
/// sort_keys=sort_keys)`, so `{"a": 1, "b": [1, 2]}` with Python's spacing and no HTML escaping.
fn tojson(value: Value, kwargs: Kwargs) -> Result<String, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match (v.as_i64(), v.as_str()) {
            (Some(n), _) => Some(" ".repeat(n.max(0) as usize)),
            (None, Some(s)) => Some(s.to_string()),
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: indent must be an integer or a string, not {v}"),
                ))
            }
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() && !v.is_undefined() => {
            let parts: Vec<String> = v
                .try_iter()?
                .map(|p| p.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .unwrap_or_default();
            match parts.as_slice() {
                [a, b] => (a.clone(), b.clone()),
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be two strings",
                    ))
                }
            }
        }
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let w = PyJson {
        indent,
        item_sep,
        key_sep,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    w.write(&value, 0, &mut out)?;
    Ok(out)
}

struct PyJson {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

impl PyJson {
    fn write(&self, v: &Value, depth: usize, out: &mut String) -> Result<(), Error> {
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => match v.as_i64() {
                Some(n) => out.push_str(&n.to_string()),
                None => {
                    let f = f64::try_from(v.clone())?;
                    if f.is_finite() {
                        out.push_str(&serde_json::to_string(&f).map_err(json_err)?);
                    } else if f.is_nan() {
                        out.push_str("NaN");
                    } else {
                        out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
                    }
                }
            },
            ValueKind::String => self.string(v.as_str().unwrap_or_default(), out)?,
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort();
                }
                let items = keys
                    .into_iter()
                    .map(|k| v.get_item(&k).map(|x| (k, x)))
                    .collect::<Result<Vec<_>, _>>()?;
                self.container(('{', '}'), &items, depth, out, |(k, x), out| {
                    match k.as_str() {
                        Some(s) => self.string(s, out)?,
                        None => self.string(&k.to_string(), out)?,
                    }
                    out.push_str(&self.key_sep);
                    self.write(x, depth + 1, out)
                })?;
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                self.container(('[', ']'), &items, depth, out, |x, out| self.write(x, depth + 1, out))?;
            }
            _ => self.string(&v.to_string(), out)?,
        }
        Ok(())
    }

    fn container<T>(
        &self,
        (open, close): (char, char),
        items: &[T],
        depth: usize,
        out: &mut String,
        mut item: impl FnMut(&T, &mut String) -> Result<(), Error>,
    ) -> Result<(), Error> {
        out.push(open);
        if items.is_empty() {
            out.push(close);
            return Ok(());
        }
        for (i, x) in items.iter().enumerate() {
            if i > 0 {
                out.push_str(&self.item_sep);
            }
            if let Some(ind) = &self.indent {
                out.push('\n');
                out.push_str(&ind.repeat(depth + 1));
            }
            item(x, out)?;
        }
        if let Some(ind) = &self.indent {
            out.push('\n');
            out.push_str(&ind.repeat(depth));
        }
        out.push(close);
        Ok(())
    }

    fn string(&self, s: &str, out: &mut String) -> Result<(), Error> {
        let quoted = serde_json::to_string(s).map_err(json_err)?;
        if self.ensure_ascii {
            for c in quoted.chars() {
                if c.is_ascii() {
                    out.push(c);
                } else {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
            }
        } else {
            out.push_str(&quoted);
        }
        Ok(())
    }
}

fn json_err(e: serde_json::Error) -> Error {
    Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}"))
}

/// transformers' `strftime_now(format)`: the current time formatted with C's `strftime`. Here in
/// UTC, with the directives chat templates use.
fn strftime_now(format: String) -> Result<String, Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(&format, secs)
}

fn strftime(format: &str, unix_secs: i64) -> Result<String, Error> {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix_secs.div_euclid(86_400);
    let tod = unix_secs.rem_euclid(86_400);
    let (h, mi, s) = (tod / 3600, tod / 60 % 60, tod % 60);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(m - 1) as usize] + d + i64::from(leap && m > 2);
    let wday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let month = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let piece = match chars.next() {
            Some('Y') => y.to_string(),
            Some('y') => format!("{:02}", y.rem_euclid(100)),
            Some('m') => format!("{m:02}"),
            Some('d') => format!("{d:02}"),
            Some('e') => format!("{d:>2}"),
            Some('-') if chars.as_str().starts_with('d') => {
                chars.next();
                d.to_string()
            }
            Some('j') => format!("{yday:03}"),
            Some('H') => format!("{h:02}"),
            Some('I') => format!("{:02}", if h % 12 == 0 { 12 } else { h % 12 }),
            Some('M') => format!("{mi:02}"),
            Some('S') => format!("{s:02}"),
            Some('p') => (if h < 12 { "AM" } else { "PM" }).to_string(),
            Some('b') | Some('h') => month[..3].to_string(),
            Some('B') => month.to_string(),
            Some('a') => DAYS[wday][..3].to_string(),
            Some('A') => DAYS[wday].to_string(),
            Some('F') => format!("{y}-{m:02}-{d:02}"),
            Some('T') => format!("{h:02}:{mi:02}:{s:02}"),
            Some('Z') => "UTC".to_string(),
            Some('z') => "+0000".to_string(),
            Some('%') => "%".to_string(),
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!(
                        "strftime_now: unsupported directive %{}",
                        other.map(String::from).unwrap_or_default()
                    ),
                ))
            }
        };
        out.push_str(&piece);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(src: &str, messages: &[ChatMessage]) -> Result<String, TokenizerError> {
        ChatTemplate::new(src.to_string())?.render(messages, true, &SpecialTokens::default())
    }

    #[test]
    fn strftime_known_dates() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let t = 1_709_211_909;
        assert_eq!(strftime("%Y-%m-%d %H:%M:%S", t).unwrap(), "2024-02-29 13:05:09");
        assert_eq!(
            strftime("%d %b %Y, %A %j %I%p %%", t).unwrap(),
            "29 Feb 2024, Thursday 060 01PM %"
        );
        assert_eq!(strftime("%F %T", 0).unwrap(), "1970-01-01 00:00:00");
        assert_eq!(strftime("%a %B %-d %y", 951_782_400).unwrap(), "Tue February 29 00");
        assert!(strftime("%Q", 0).is_err());
    }

    #[test]
    fn tojson_is_pythons_json_dumps() {
        let m = [ChatMessage::new("user", "a \"q\" <b> é\n")];
        let out = render("{{ messages[0] | tojson }}|{{ messages | tojson(indent=2) }}", &m).unwrap();
        assert_eq!(
            out,
            "{\"role\": \"user\", \"content\": \"a \\\"q\\\" <b> é\\n\"}|[\n  {\n    \"role\": \"user\",\n    \
             \"content\": \"a \\\"q\\\" <b> é\\n\"\n  }\n]"
        );
        let out = render("{{ {'b': 1, 'a': [1.5, none, true]} | tojson(sort_keys=true, ensure_ascii=true) }}{{ 'é' | tojson(ensure_ascii=true) }}", &[]).unwrap();
        assert_eq!(out, "{\"a\": [1.5, null, true], \"b\": 1}\"\\u00e9\"");
        assert!(matches!(
            render("{{ 1 | tojson(bogus=1) }}", &[]),
            Err(TokenizerError::TemplateRender(_))
        ));
    }

    #[test]
    fn bad_templates_are_typed_errors() {
        assert!(matches!(
            render("{% for m in messages %}", &[]),
            Err(TokenizerError::TemplateSyntax(_))
        ));
        assert!(matches!(
            render("{{ messages[0].content.nope() }}", &[ChatMessage::new("u", "x")]),
            Err(TokenizerError::TemplateRender(_))
        ));
        match render("{{ raise_exception('roles must alternate') }}", &[]) {
            Err(TokenizerError::TemplateException(m)) => assert_eq!(m, "roles must alternate"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn undefined_special_tokens_render_empty() {
        assert_eq!(render("[{{ bos_token }}]", &[]).unwrap(), "[]");
    }

    #[test]
    fn template_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<ChatTemplate>();
    }
}
