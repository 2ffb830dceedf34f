//! The rules a real API server holds a CustomResourceDefinition to, and the schema check it
//! runs on the custom resources it then serves. Each rule, and where it comes from
//! (`k8s.io/apiextensions-apiserver`, `pkg/apis/apiextensions/validation` and `pkg/apiserver/
//! schema`):
//! - **structural schema**: every node that has `properties`, `items` or
//!   `additionalProperties` states its `type` (`Required value: must not be empty for
//!   specified object fields`);
//! - **defaults are valid against their own schema** (`validateStructuralDefaults`): a
//!   `default: []` beside `minItems: 1` is refused with go-openapi's wording, `Invalid value: 0:
//!   in body should have at least 1 items`;
//! - **known formats only**: the formats the server validates (`supportedFormats`: `uri`,
//!   `email`, `hostname`, `ipv4`, `ipv6`, `cidr`, `mac`, `uuid*`, `byte`, `date`, `date-time`,
//!   `duration`, `password`, ...; `int32` and `int64` for integers, `float` and `double` for
//!   numbers); any other is a warning the server sends back;
//! - **list-map keys** (`x-kubernetes-list-map-keys`) are required or defaulted in the items;
//! - **CEL rules compile and fit the cost budget** ([`super::cel_cost`]): each rule's estimated
//!   cost times how often it may run at most 10,000,000 (`estimated rule cost exceeds budget by
//!   factor of ...`), all rules of a CRD together at most 100,000,000.
//!
//! Custom resources are checked against the schema ([`validate`]): type, enum, required,
//! `min/maxItems`, `min/maxLength`, `pattern`, `minimum/maximum`, and the CEL rules.

use serde_json::Value;

use super::cel_cost;

/// One finding about a CRD, with the API server's field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// A warning (the server accepts and says so) or an error (it refuses).
    pub warning: bool,
    /// `spec.validation.openAPIV3Schema.properties[spec]...: Invalid value: ...`.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

const STRING_FORMATS: &[&str] = &[
    "bsonobjectid",
    "uri",
    "email",
    "hostname",
    "ipv4",
    "ipv6",
    "cidr",
    "mac",
    "uuid",
    "uuid3",
    "uuid4",
    "uuid5",
    "isbn",
    "isbn10",
    "isbn13",
    "creditcard",
    "ssn",
    "hexcolor",
    "rgbcolor",
    "byte",
    "password",
    "date",
    "duration",
    "datetime",
    "date-time",
];

/// Every problem the API server finds in a CRD (as JSON).
pub fn check_crd(crd: &Value) -> Vec<Problem> {
    let mut out = Vec::new();
    let versions = crd["spec"]["versions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut total = 0u64;
    for (i, version) in versions.iter().enumerate() {
        let Some(schema) = version["schema"].get("openAPIV3Schema") else {
            continue;
        };
        // The server reports a schema shared by every version under `spec.validation`.
        let root = if versions.len() == 1 {
            "spec.validation.openAPIV3Schema".to_owned()
        } else {
            format!("spec.versions[{i}].schema.openAPIV3Schema")
        };
        let mut walker = Walker {
            out: &mut out,
            total: 0,
        };
        walker.node(schema, &root, Some(1));
        total = total.saturating_add(walker.total);
        if total > cel_cost::CRD_LIMIT {
            out.push(Problem {
                warning: false,
                message: format!(
                    "{root}: Forbidden: {}",
                    cel_cost::over_budget("total CRD cost", total, cel_cost::CRD_LIMIT)
                ),
            });
        }
    }
    out
}

struct Walker<'a> {
    out: &'a mut Vec<Problem>,
    total: u64,
}

impl Walker<'_> {
    fn error(&mut self, message: String) {
        self.out.push(Problem {
            warning: false,
            message,
        });
    }

    /// `bounds`: the product of `maxItems`/`maxProperties` above, `None` under an unbounded
    /// list or map.
    fn node(&mut self, schema: &Value, path: &str, bounds: Option<u64>) {
        let ty = schema["type"].as_str().unwrap_or("");
        let open = schema["x-kubernetes-int-or-string"] == Value::Bool(true)
            || schema["x-kubernetes-preserve-unknown-fields"] == Value::Bool(true);
        let nested = ["properties", "items", "additionalProperties"]
            .iter()
            .any(|k| schema.get(*k).is_some_and(Value::is_object));
        if ty.is_empty() && nested && !open {
            self.error(format!(
                "{path}.type: Required value: must not be empty for specified object fields"
            ));
        }
        if let Some(format) = schema["format"].as_str() {
            let known = match ty {
                "integer" => ["int32", "int64"].contains(&format),
                "number" => ["float", "double"].contains(&format),
                "string" => STRING_FORMATS.contains(&format),
                _ => false,
            };
            if !known {
                self.out.push(Problem {
                    warning: true,
                    message: format!(
                        "{path}.format: unrecognized format {format:?} for type {ty:?}"
                    ),
                });
            }
        }
        if let Some(default) = schema.get("default") {
            for e in validate_value(schema, default, "") {
                self.error(format!("{path}.default{e}"));
            }
        }
        if let Some(keys) = schema["x-kubernetes-list-map-keys"].as_array() {
            let items = &schema["items"];
            for key in keys.iter().filter_map(Value::as_str) {
                let required = items["required"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|k| k == key));
                let defaulted = items["properties"][key].get("default").is_some();
                if !required && !defaulted {
                    self.error(format!(
                        "{path}.items.properties[{key}]: Required value: this property is in x-kubernetes-list-map-keys, so it must have a default or be a required property"
                    ));
                }
            }
        }
        if let Some(rules) = schema["x-kubernetes-validations"].as_array() {
            for (i, rule) in rules.iter().enumerate() {
                let text = rule["rule"].as_str().unwrap_or("");
                let at = format!("{path}.x-kubernetes-validations[{i}].rule");
                match cel_cost::rule_cost(text, schema) {
                    Err(e) => self.error(format!(
                        "{at}: Invalid value: {text:?}: compilation failed: {e}"
                    )),
                    Ok(cost) => {
                        let cost = cost.saturating_mul(cel_cost::cardinality(bounds, schema));
                        self.total = self.total.saturating_add(cost);
                        if cost > cel_cost::RULE_LIMIT {
                            self.error(format!(
                                "{at}: Forbidden: {}",
                                cel_cost::over_budget(
                                    "estimated rule cost",
                                    cost,
                                    cel_cost::RULE_LIMIT
                                )
                            ));
                        }
                    }
                }
            }
        }
        if let Some(props) = schema["properties"].as_object() {
            for (name, p) in props {
                self.node(p, &format!("{path}.properties[{name}]"), bounds);
            }
        }
        if let Some(items) = schema.get("items").filter(|i| i.is_object()) {
            let inner = bounds.zip(schema["maxItems"].as_u64()).map(|(a, b)| a * b);
            self.node(items, &format!("{path}.items"), inner);
        }
        if let Some(values) = schema.get("additionalProperties").filter(|i| i.is_object()) {
            let inner = bounds
                .zip(schema["maxProperties"].as_u64())
                .map(|(a, b)| a * b);
            self.node(values, &format!("{path}.additionalProperties"), inner);
        }
    }
}

fn type_matches(ty: &str, value: &Value) -> bool {
    match ty {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        _ => true,
    }
}

#[allow(clippy::too_many_lines)] // one keyword after another, as go-openapi checks them
/// go-openapi's findings for `value` against `schema`, each as `<path>: <message>` with the
/// path relative to `at` (`.spec.targetRefs`...).
fn validate_value(schema: &Value, value: &Value, at: &str) -> Vec<String> {
    let mut out = Vec::new();
    if value.is_null() && schema["nullable"] == Value::Bool(true) {
        return out;
    }
    let open = schema["x-kubernetes-int-or-string"] == Value::Bool(true);
    if let Some(ty) = schema["type"].as_str()
        && !open
        && !type_matches(ty, value)
    {
        let got = match value {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        };
        out.push(format!(
            "{at}: Invalid value: {got:?}: {at_name} in body must be of type {ty}: {got:?}",
            at_name = at.trim_start_matches('.')
        ));
        return out;
    }
    if let Some(options) = schema["enum"].as_array()
        && !options.contains(value)
    {
        let list: Vec<String> = options.iter().map(Value::to_string).collect();
        out.push(format!(
            "{at}: Unsupported value: {value}: supported values: {}",
            list.join(", ")
        ));
    }
    match value {
        Value::Array(items) => {
            let n = items.len() as u64;
            if let Some(min) = schema["minItems"].as_u64()
                && n < min
            {
                out.push(format!(
                    "{at}: Invalid value: {n}: in body should have at least {min} items"
                ));
            }
            if let Some(max) = schema["maxItems"].as_u64()
                && n > max
            {
                out.push(format!(
                    "{at}: Too many: {n}: must have at most {max} items"
                ));
            }
            if let Some(item) = schema.get("items") {
                for (i, v) in items.iter().enumerate() {
                    out.extend(validate_value(item, v, &format!("{at}[{i}]")));
                }
            }
        }
        Value::String(s) => {
            let n = s.chars().count() as u64;
            if let Some(max) = schema["maxLength"].as_u64()
                && n > max
            {
                out.push(format!("{at}: Too long: may not be more than {max} bytes"));
            }
            if let Some(min) = schema["minLength"].as_u64()
                && n < min
            {
                out.push(format!(
                    "{at}: Invalid value: {value}: in body should be at least {min} chars long"
                ));
            }
            if let Some(pattern) = schema["pattern"].as_str()
                && regex::Regex::new(pattern).is_ok_and(|r| !r.is_match(s))
            {
                out.push(format!(
                    "{at}: Invalid value: {value}: in body should match '{pattern}'"
                ));
            }
        }
        Value::Number(x) => {
            let x = x.as_f64().unwrap_or(0.0);
            if let Some(min) = schema["minimum"].as_f64()
                && x < min
            {
                out.push(format!(
                    "{at}: Invalid value: {value}: in body should be greater than or equal to {min}"
                ));
            }
            if let Some(max) = schema["maximum"].as_f64()
                && x > max
            {
                out.push(format!(
                    "{at}: Invalid value: {value}: in body should be less than or equal to {max}"
                ));
            }
        }
        Value::Object(fields) => {
            for key in schema["required"].as_array().into_iter().flatten() {
                if let Some(k) = key.as_str()
                    && !fields.contains_key(k)
                {
                    out.push(format!("{at}.{k}: Required value"));
                }
            }
            let props = schema["properties"].as_object();
            for (k, v) in fields {
                if let Some(p) = props.and_then(|p| p.get(k)) {
                    out.extend(validate_value(p, v, &format!("{at}.{k}")));
                } else if let Some(extra) =
                    schema.get("additionalProperties").filter(|a| a.is_object())
                {
                    out.extend(validate_value(extra, v, &format!("{at}.{k}")));
                }
            }
        }
        _ => {}
    }
    out
}

/// What the API server says of a custom resource against its version's schema: the schema's
/// findings, then the CEL rules' (run with kube-cel, as the server runs them), each as
/// `<field>: <message>`. `metadata`, `apiVersion` and `kind` are the server's own.
pub fn validate(schema: &Value, object: &Value) -> Vec<String> {
    let mut body = object.clone();
    if let Some(o) = body.as_object_mut() {
        for k in ["metadata", "apiVersion", "kind"] {
            o.remove(k);
        }
    }
    let mut out: Vec<String> = validate_value(schema, &body, "")
        .into_iter()
        .map(|e| e.trim_start_matches('.').to_owned())
        .collect();
    if out.is_empty()
        && let Err(errors) = kube::core::cel::Validator::new().validate(schema, object, None)
    {
        out.extend(
            errors
                .into_vec()
                .into_iter()
                .map(|e| format!("{}: Invalid value: \"object\": {}", e.field_path, e.message)),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_default_shorter_than_min_items_is_refused() {
        let crd = json!({"spec": {"versions": [{"name": "v1", "schema": {"openAPIV3Schema": {
        "type": "object", "properties": {"spec": {"type": "object", "properties": {
            "targetRefs": {"type": "array", "default": [], "minItems": 1, "items": {"type": "string"}},
            "port": {"type": "integer", "format": "uint16"},
        }}}}}}]}});
        let problems = check_crd(&crd);
        assert_eq!(
            problems[1].message,
            "spec.validation.openAPIV3Schema.properties[spec].properties[targetRefs].default: Invalid value: 0: in body should have at least 1 items"
        );
        assert!(!problems[1].warning);
        assert!(problems[0].warning && problems[0].message.contains("\"uint16\""));
    }

    #[test]
    fn objects_are_checked_against_the_schema() {
        let schema = json!({"type": "object", "required": ["spec"], "properties": {"spec": {
        "type": "object", "required": ["targetRefs"], "properties": {
            "targetRefs": {"type": "array", "minItems": 1, "items": {"type": "string", "pattern": "^[a-z]+$"}},
            "mode": {"type": "string", "enum": ["Strict", "Permissive"]},
        }}}});
        let ok = json!({"apiVersion": "x/v1", "kind": "X", "metadata": {"name": "a"},
            "spec": {"targetRefs": ["a"], "mode": "Strict"}});
        assert_eq!(validate(&schema, &ok), Vec::<String>::new());
        let bad = json!({"spec": {"targetRefs": ["A"], "mode": "Loose"}});
        let errors = validate(&schema, &bad);
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("spec.targetRefs[0]: Invalid value")),
            "{errors:?}"
        );
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("spec.mode: Unsupported value")),
            "{errors:?}"
        );
        assert_eq!(
            validate(&schema, &json!({"spec": {}})),
            ["spec.targetRefs: Required value"]
        );
    }
}
