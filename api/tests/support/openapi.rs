//! A small validator for cgvm's `api/openapi.yaml` (Swagger 2.0), for tests: which routes the
//! description has, and whether an answer's body fits the schema the description gives for
//! its path, method and status.
//!
//! Include it from any test crate with
//! `#[path = "../api/tests/support/openapi.rs"] mod openapi;` (the path relative to the
//! including file); it needs `serde_yaml` 0.9 and `serde_json` as dev-dependencies.
//!
//! Schema keywords understood: `$ref` (to `#/definitions/...`), `type` (object, array, string,
//! integer, number, boolean), `properties`, `required`, `additionalProperties` (true, false or
//! a schema), `enum`, `items`, `minimum`, `maximum`. Anything else is ignored.
//!
//! Where the answer is looked up: the operation's response for the status, else the
//! operation's `default`, else the top-level `responses` entry named by the status (this
//! description keys them so: 400 for malformed HTTP, 404, 405, 503).

#![allow(dead_code)]

use std::path::Path;

use serde_json::{Map, Value};

/// A loaded API description.
#[derive(Debug, Clone)]
pub struct Spec {
    doc: Value,
}

const METHODS: [&str; 7] = ["get", "put", "post", "patch", "delete", "head", "options"];

/// YAML to JSON, with every map key made a string (YAML allows `200:` as an integer key).
fn to_json(v: serde_yaml::Value) -> Result<Value, String> {
    use serde_yaml::Value as Y;
    Ok(match v {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(b),
        Y::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                let f = n.as_f64().ok_or_else(|| format!("number {n}"))?;
                serde_json::Number::from_f64(f)
                    .map(Value::Number)
                    .ok_or_else(|| format!("number {n} has no JSON form"))?
            }
        }
        Y::String(s) => Value::String(s),
        Y::Sequence(s) => Value::Array(s.into_iter().map(to_json).collect::<Result<_, _>>()?),
        Y::Mapping(m) => {
            let mut out = Map::new();
            for (k, v) in m {
                let key = match k {
                    Y::String(s) => s,
                    Y::Number(n) => n.to_string(),
                    Y::Bool(b) => b.to_string(),
                    other => return Err(format!("unsupported map key {other:?}")),
                };
                out.insert(key, to_json(v)?);
            }
            Value::Object(out)
        }
        Y::Tagged(t) => to_json(t.value)?,
    })
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Whether a concrete path fits a template (`/drives/rootfs` fits `/drives/{drive_id}`).
pub fn path_matches(template: &str, path: &str) -> bool {
    let t: Vec<&str> = template.split('/').collect();
    let p: Vec<&str> = path.split('/').collect();
    t.len() == p.len()
        && t.iter()
            .zip(&p)
            .all(|(t, p)| (t.starts_with('{') && t.ends_with('}')) || t == p)
}

impl Spec {
    /// Reads and parses the description at `path`.
    pub fn load(path: &Path) -> Result<Spec, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses a description from its text.
    pub fn parse(text: &str) -> Result<Spec, String> {
        let yaml: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        let doc = to_json(yaml)?;
        if doc.get("swagger").and_then(Value::as_str) != Some("2.0") {
            return Err("not a Swagger 2.0 document".into());
        }
        if !doc.get("paths").is_some_and(Value::is_object) {
            return Err("no paths".into());
        }
        Ok(Spec { doc })
    }

    /// The document as JSON.
    pub fn doc(&self) -> &Value {
        &self.doc
    }

    fn paths(&self) -> &Map<String, Value> {
        static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
        self.doc
            .get("paths")
            .and_then(Value::as_object)
            .unwrap_or_else(|| EMPTY.get_or_init(Map::new))
    }

    /// Every (METHOD, path template) the description has, the method in upper case.
    pub fn routes(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (path, item) in self.paths() {
            for m in METHODS {
                if item.get(m).is_some() {
                    out.push((m.to_ascii_uppercase(), path.clone()));
                }
            }
        }
        out
    }

    /// The template a concrete path fits, preferring an exact match.
    pub fn match_path(&self, path: &str) -> Option<&str> {
        let paths = self.paths();
        if let Some((k, _)) = paths.get_key_value(path) {
            return Some(k.as_str());
        }
        paths
            .keys()
            .find(|t| path_matches(t, path))
            .map(String::as_str)
    }

    /// Follows a `$ref` (only `#/...` references into this document).
    fn resolve<'a>(&'a self, schema: &'a Value) -> Result<&'a Value, String> {
        let mut s = schema;
        for _ in 0..32 {
            let Some(r) = s.get("$ref").and_then(Value::as_str) else {
                return Ok(s);
            };
            let pointer = r
                .strip_prefix('#')
                .ok_or_else(|| format!("$ref {r} is not local"))?;
            s = self
                .doc
                .pointer(pointer)
                .ok_or_else(|| format!("$ref {r} points nowhere"))?;
        }
        Err("$ref chain too long".into())
    }

    /// The response object the description gives for this answer.
    fn response_for(&self, method: &str, path: &str, status: u16) -> Result<&Value, String> {
        let code = status.to_string();
        let op = self
            .match_path(path)
            .and_then(|t| self.paths().get(t))
            .and_then(|item| item.get(method.to_ascii_lowercase()));
        let from_op = op
            .and_then(|op| op.get("responses"))
            .and_then(|r| r.get(&code).or_else(|| r.get("default")));
        let global = self.doc.get("responses").and_then(|r| r.get(&code));
        let r = from_op
            .or(global)
            .ok_or_else(|| format!("{method} {path}: the description has no {status} answer"))?;
        self.resolve(r)
    }

    /// Checks an answer against the description: the response object for `method`, `path`
    /// (concrete, such as `/drives/rootfs`) and `status`. `body` is the parsed JSON body,
    /// `Value::Null` for an answer without one. A response with a schema needs a body that fits
    /// it; one without a schema needs no body.
    pub fn validate_response(
        &self,
        method: &str,
        path: &str,
        status: u16,
        body: &Value,
    ) -> Result<(), String> {
        let response = self.response_for(method, path, status)?;
        match (response.get("schema"), body) {
            (None, Value::Null) => Ok(()),
            (None, b) => Err(format!(
                "{method} {path} {status}: the description has no body for this answer, got {b}"
            )),
            (Some(_), Value::Null) => Err(format!(
                "{method} {path} {status}: the description gives a body, the answer has none"
            )),
            (Some(schema), b) => self
                .validate(schema, b, "$")
                .map_err(|e| format!("{method} {path} {status}: {e}")),
        }
    }

    /// Checks `value` against `schema`; `at` names where `value` is, for the error.
    pub fn validate(&self, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
        let schema = self.resolve(schema)?;
        if let Some(t) = schema.get("type").and_then(Value::as_str) {
            let got = type_name(value);
            let ok = got == t || (t == "number" && got == "integer");
            if !ok {
                return Err(format!("{at}: expected {t}, got {got} {value}"));
            }
        }
        if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
            if !allowed.contains(value) {
                return Err(format!("{at}: {value} is not one of {allowed:?}"));
            }
        }
        if let Some(n) = value.as_f64() {
            if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
                if n < min {
                    return Err(format!("{at}: {value} is below the minimum {min}"));
                }
            }
            if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
                if n > max {
                    return Err(format!("{at}: {value} is above the maximum {max}"));
                }
            }
        }
        if let (Some(items), Some(arr)) = (schema.get("items"), value.as_array()) {
            for (i, v) in arr.iter().enumerate() {
                self.validate(items, v, &format!("{at}[{i}]"))?;
            }
        }
        if let Some(obj) = value.as_object() {
            let props = schema.get("properties").and_then(Value::as_object);
            if let Some(required) = schema.get("required").and_then(Value::as_array) {
                for r in required.iter().filter_map(Value::as_str) {
                    if !obj.contains_key(r) {
                        return Err(format!("{at}: required field `{r}` is missing"));
                    }
                }
            }
            for (k, v) in obj {
                let here = format!("{at}.{k}");
                if let Some(p) = props.and_then(|p| p.get(k)) {
                    self.validate(p, v, &here)?;
                    continue;
                }
                match schema.get("additionalProperties") {
                    Some(Value::Bool(false)) => {
                        return Err(format!("{at}: field `{k}` is not in the description"))
                    }
                    Some(extra @ Value::Object(_)) => self.validate(extra, v, &here)?,
                    _ => {}
                }
            }
        }
        Ok(())
    }
}
