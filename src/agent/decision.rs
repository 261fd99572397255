//! The route decision: what pi's decision turn said, parsed with the reference's rules.
//!
//! A fenced ```` ```json {…} ``` ```` block wins, then the whole reply as JSON; a reply
//! that is no JSON object falls back to `decision: direct|millrace` / `why: …` lines, and
//! to the direct route when even those are missing. Values are read with Python's
//! truthiness and `str()`, as the reference reads them (so `"custom_loop_needed": "false"`
//! is true there and here).

use std::sync::LazyLock;

use regex::Regex;
use serde_json::{Map, Value};

use crate::contract::pyjson::py_str;
use crate::contract::request::is_truthy;
use crate::contract::vocab::Route;
use crate::millrace::intake::IntakeKind;

/// The default mode of a decision that names none.
pub const DEFAULT_MODE: &str = "default_pi";

/// How to handle one task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// `direct` or `millrace` (never `auto`: this is the decision).
    pub route: Route,
    pub why: String,
    /// The Millrace mode for delegated work (`default_pi` when pi named none).
    pub mode: String,
    /// Whether pi named the mode itself: only then does it override the workspace's mode
    /// (the reference always forces the decision's mode, also its silent default).
    pub mode_given: bool,
    pub custom_loop_needed: bool,
    pub notes: String,
    pub intake_kind: Option<IntakeKind>,
    pub signals: Vec<String>,
}

impl Decision {
    /// A route chosen by the caller (`--route`, `route_preference`): no decision turn.
    pub fn forced(route: Route) -> Self {
        Self {
            route,
            why: format!("route forced by --route {route}"),
            mode: DEFAULT_MODE.to_string(),
            mode_given: false,
            custom_loop_needed: false,
            notes: String::new(),
            intake_kind: None,
            signals: Vec::new(),
        }
    }

    pub fn is_direct(&self) -> bool {
        self.route == Route::Direct
    }

    /// The reference's warning when pi asks for a custom loop.
    pub fn warnings(&self) -> Vec<String> {
        if !self.custom_loop_needed {
            return Vec::new();
        }
        vec![format!(
            "Pi indicated that a custom Millrace loop may be needed; Millracer will still use `{}` unless the caller passes a different --millrace-mode.",
            self.mode
        )]
    }
}

static JSON_FENCE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?is)```(?:json)?\s*(?P<body>\{.*?\})\s*```").expect("static regex")
});
static ROUTE_LINE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?im)^\s*decision\s*:\s*(?P<route>direct|millrace)\s*$").expect("static regex")
});
static WHY_LINE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?im)^\s*why\s*:\s*(?P<why>.+?)\s*$").expect("static regex"));

/// Parses a decision reply. Never fails: anything unreadable is the direct route.
pub fn parse_decision(raw: &str) -> Decision {
    if let Some(payload) = load_payload(raw) {
        let route = normalize_route(first_truthy(&payload, &["decision", "route"]));
        let why = text_of(payload.get("why"));
        let mode = text_of(payload.get("mode"));
        return Decision {
            route,
            why: if why.is_empty() {
                "Pi selected this route.".to_string()
            } else {
                why
            },
            mode_given: !mode.is_empty(),
            mode: if mode.is_empty() {
                DEFAULT_MODE.to_string()
            } else {
                mode
            },
            custom_loop_needed: payload.get("custom_loop_needed").is_some_and(is_truthy),
            notes: text_of(payload.get("notes")),
            intake_kind: payload
                .get("intake_kind")
                .and_then(|v| IntakeKind::parse(&text_of(Some(v)))),
            signals: match payload.get("signals") {
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|item| text_of(Some(item)))
                    .filter(|s| !s.is_empty())
                    .collect(),
                _ => Vec::new(),
            },
        };
    }
    let route = ROUTE_LINE
        .captures(raw)
        .and_then(|c| c.name("route"))
        .and_then(|m| Route::parse(&m.as_str().to_lowercase()))
        .unwrap_or(Route::Direct);
    let why = WHY_LINE
        .captures(raw)
        .and_then(|c| c.name("why"))
        .map_or_else(
            || "Pi returned unstructured output.".to_string(),
            |m| m.as_str().trim().to_string(),
        );
    Decision {
        route,
        why,
        ..Decision::forced(Route::Direct)
    }
}

/// The fenced JSON body first, then the whole stripped reply: the first that is an object.
fn load_payload(raw: &str) -> Option<Map<String, Value>> {
    let mut candidates = Vec::new();
    if let Some(body) = JSON_FENCE.captures(raw).and_then(|c| c.name("body")) {
        candidates.push(body.as_str().trim());
    }
    candidates.push(raw.trim());
    candidates
        .into_iter()
        .filter(|c| c.starts_with('{'))
        .find_map(|c| match serde_json::from_str::<Value>(c) {
            Ok(Value::Object(map)) => Some(map),
            _ => None,
        })
}

/// Python's `payload.get(a) or payload.get(b)`.
fn first_truthy<'a>(payload: &'a Map<String, Value>, keys: &[&str]) -> Option<&'a Value> {
    let mut last = None;
    for key in keys {
        last = payload.get(*key);
        if last.is_some_and(is_truthy) {
            return last;
        }
    }
    last
}

/// Python's `str(value or "").strip()`.
fn text_of(value: Option<&Value>) -> String {
    match value {
        Some(v) if is_truthy(v) => py_str(v).trim().to_string(),
        _ => String::new(),
    }
}

fn normalize_route(value: Option<&Value>) -> Route {
    match Route::parse(&text_of(value).to_lowercase()) {
        Some(Route::Millrace) => Route::Millrace,
        _ => Route::Direct,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fenced_json_wins_and_values_read_like_python() {
        let d = parse_decision(
            "Sure.\n```JSON\n{\"decision\": \" MillRace \", \"intake_kind\": \" IDEA \", \"why\": 5, \"custom_loop_needed\": \"false\", \"signals\": [\" a \", 0, 2, \"\", null], \"mode\": \"learning_pi\"}\n```\n{\"decision\": \"direct\"}",
        );
        assert_eq!(d.route, Route::Millrace);
        assert_eq!(d.intake_kind, Some(IntakeKind::Idea));
        assert_eq!(d.why, "5");
        assert!(d.custom_loop_needed);
        assert_eq!(d.signals, vec!["a", "2"]);
        assert_eq!((d.mode.as_str(), d.mode_given), ("learning_pi", true));
        assert_eq!(d.notes, "");
    }

    #[test]
    fn whole_reply_json_and_defaults() {
        let d = parse_decision("  {\"decision\": \"\", \"route\": \"millrace\"}  ");
        assert_eq!(d.route, Route::Millrace);
        assert_eq!(d.why, "Pi selected this route.");
        assert_eq!((d.mode.as_str(), d.mode_given), ("default_pi", false));
        assert_eq!(d.intake_kind, None);
        let d = parse_decision("{\"decision\": \"elsewhere\"}");
        assert_eq!(d.route, Route::Direct);
    }

    #[test]
    fn unstructured_replies_fall_back() {
        let d = parse_decision("I think so.\nDecision: MILLRACE\nwhy:  it is big  \n");
        assert_eq!(d.route, Route::Millrace);
        assert_eq!(d.why, "it is big");
        let d = parse_decision("no idea");
        assert_eq!(d.route, Route::Direct);
        assert_eq!(d.why, "Pi returned unstructured output.");
        assert!(!d.custom_loop_needed);
        // A broken fence falls through to the line rules.
        let d = parse_decision("```json\n{\"decision\": millrace}\n```\ndecision: millrace");
        assert_eq!(d.route, Route::Millrace);
    }

    #[test]
    fn custom_loop_warning_names_the_mode() {
        let d = parse_decision("{\"decision\": \"millrace\", \"custom_loop_needed\": true}");
        assert_eq!(
            d.warnings(),
            vec![
                "Pi indicated that a custom Millrace loop may be needed; Millracer will still use `default_pi` unless the caller passes a different --millrace-mode."
            ]
        );
    }
}
