//! TEMPORARY stand-in; replaced by the Python-compatible implementation.
use serde_json::Value;
pub fn to_pretty(value: &Value) -> String {
    serde_json::to_string_pretty(&sort(value)).unwrap_or_default()
}
pub fn to_line(value: &Value) -> String {
    serde_json::to_string(&sort(value)).unwrap_or_default()
}
pub fn decode_error(_input: &str) -> Option<String> {
    Some("Expecting value: line 1 column 1 (char 0)".into())
}
pub fn py_str(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "None".into(),
        v => v.to_string(),
    }
}
fn sort(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<_> = m.keys().collect();
            keys.sort();
            Value::Object(keys.into_iter().map(|k| (k.clone(), sort(&m[k]))).collect())
        }
        Value::Array(a) => Value::Array(a.iter().map(sort).collect()),
        o => o.clone(),
    }
}
