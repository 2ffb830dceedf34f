//! The API server's static cost estimate of a CRD validation rule, so an over-budget rule
//! fails here as `kubectl apply` of the CRD fails on a cluster. It follows cel-go's
//! estimator (`checker/cost.go`) and the API server's size assumptions
//! (`apiextensions-apiserver` `schema/cel`): a list without `maxItems` holds as many of its
//! smallest items as fit in a 3 MiB request, a string without `maxLength` (or `enum`) is that
//! long, and a rule under such a list runs once per item that could fit. Functions are costed
//! as cel-go and the Kubernetes CEL library cost them: O(1) calls 1, string scans 0.1 per
//! character, `contains` and `matches` the product of both sides, a comprehension its body
//! times the size of its range.

use kube::core::cel::cel::Program;
use kube::core::cel::cel::common::ast::{ComprehensionExpr, Expr, LiteralValue};
use serde_json::Value;

/// The API server's request size limit, which bounds every unbounded list and string.
pub const MAX_REQUEST_BYTES: u64 = 3 * 1024 * 1024;
/// Per rule: `StaticEstimatedCostLimit`.
pub const RULE_LIMIT: u64 = 10_000_000;
/// Per CRD, all rules together: `StaticEstimatedCRDCostLimit`.
pub const CRD_LIMIT: u64 = 100_000_000;

const STRING_TRAVERSAL: f64 = 0.1;
const REGEX_LENGTH: f64 = 0.25;
const UNKNOWN: u64 = u64::MAX;

/// A CEL type with the bounds the schema gives it.
#[derive(Clone, Debug)]
enum Ty {
    Bool,
    Int,
    Double,
    Duration,
    Timestamp,
    Str(u64),
    List(u64, Box<Ty>),
    Map(u64, Box<Ty>),
    Object(Value),
    Dyn,
}

impl Ty {
    fn size(&self) -> u64 {
        match self {
            Ty::Bool | Ty::Int | Ty::Double | Ty::Duration | Ty::Timestamp => 1,
            Ty::Str(n) | Ty::List(n, _) | Ty::Map(n, _) => *n,
            Ty::Object(_) | Ty::Dyn => UNKNOWN,
        }
    }
}

fn str_of(s: &Value) -> Option<&str> {
    s.as_str()
}

/// The schema's CEL type (the API server's `SchemaDeclType`).
fn ty_of(schema: &Value) -> Ty {
    if schema["x-kubernetes-int-or-string"] == Value::Bool(true) {
        return Ty::Dyn;
    }
    match str_of(&schema["type"]).unwrap_or("") {
        "boolean" => Ty::Bool,
        "integer" => Ty::Int,
        "number" => Ty::Double,
        "string" => match str_of(&schema["format"]).unwrap_or("") {
            "duration" => Ty::Duration,
            "date" | "date-time" => Ty::Timestamp,
            _ => Ty::Str(max_string_length(schema)),
        },
        "array" => {
            let items = &schema["items"];
            let max = schema["maxItems"]
                .as_u64()
                .unwrap_or_else(|| (MAX_REQUEST_BYTES - 2) / (min_size(items) + 1));
            Ty::List(max, Box::new(ty_of(items)))
        }
        "object" if schema.get("properties").is_some() => Ty::Object(schema.clone()),
        "object" if schema["additionalProperties"].is_object() => {
            let values = &schema["additionalProperties"];
            let max = schema["maxProperties"]
                .as_u64()
                .unwrap_or_else(|| (MAX_REQUEST_BYTES - 2) / (min_size(values) + 6));
            Ty::Map(max, Box::new(ty_of(values)))
        }
        _ => Ty::Dyn,
    }
}

fn max_string_length(schema: &Value) -> u64 {
    if let Some(n) = schema["maxLength"].as_u64() {
        return n;
    }
    if let Some(e) = schema["enum"].as_array() {
        return e
            .iter()
            .filter_map(Value::as_str)
            .map(|s| s.chars().count() as u64)
            .max()
            .unwrap_or(0);
    }
    // Less the two quotes.
    MAX_REQUEST_BYTES - 2
}

/// The smallest JSON a value of this schema serialises to (the API server's
/// `MinSerializedSize`): what it divides the request size by for an unbounded list.
pub fn min_size(schema: &Value) -> u64 {
    match str_of(&schema["type"]).unwrap_or("") {
        "string" => match str_of(&schema["format"]).unwrap_or("") {
            "duration" => 4,
            "date" => 12,
            "date-time" => 20,
            _ => 2,
        },
        "boolean" => 4,
        "integer" | "number" => 1,
        "object" => {
            let required: Vec<&str> = schema["required"]
                .as_array()
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let props = schema["properties"].as_object();
            2 + required
                .iter()
                .filter_map(|name| Some((name, props?.get(*name)?)))
                .filter(|(_, p)| p.get("default").is_none())
                .map(|(name, p)| name.len() as u64 + min_size(p) + 4)
                .sum::<u64>()
        }
        _ => 2,
    }
}

/// How many times a rule at a schema node may run per object: the product of `maxItems` and
/// `maxProperties` above it, or, under an unbounded list or map, as many of the node's
/// smallest values as fit in a request.
pub fn cardinality(bounds: Option<u64>, node: &Value) -> u64 {
    bounds.unwrap_or_else(|| MAX_REQUEST_BYTES / (min_size(node) + 1))
}

/// One expression's estimate: its maximum cost, its type and, where known, its size.
#[derive(Debug)]
struct Est {
    cost: u64,
    ty: Ty,
    size: Option<u64>,
}

impl Est {
    fn new(cost: u64, ty: Ty) -> Est {
        Est {
            cost,
            ty,
            size: None,
        }
    }

    fn size(&self) -> u64 {
        self.size.unwrap_or_else(|| self.ty.size())
    }
}

/// `ceil(size * factor)`, with an unknown size staying unknown.
fn scaled(size: u64, factor: f64) -> u64 {
    if size == UNKNOWN {
        return UNKNOWN;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let n = (size as f64 * factor).ceil() as u64;
    n
}

struct Coster {
    scopes: Vec<(String, Ty, Option<u64>)>,
}

impl Coster {
    fn lookup(&self, name: &str) -> Option<(Ty, Option<u64>)> {
        self.scopes
            .iter()
            .rev()
            .find(|(n, _, _)| n == name)
            .map(|(_, t, s)| (t.clone(), *s))
    }

    fn cost(&mut self, e: &Expr) -> Est {
        match e {
            Expr::Literal(l) => {
                let (ty, size) = match l {
                    LiteralValue::String(s) => {
                        let n = s.inner().chars().count() as u64;
                        (Ty::Str(n), n)
                    }
                    LiteralValue::Bytes(b) => (Ty::Str(b.len() as u64), b.len() as u64),
                    LiteralValue::Boolean(_) => (Ty::Bool, 1),
                    LiteralValue::Double(_) => (Ty::Double, 1),
                    LiteralValue::Int(_) | LiteralValue::UInt(_) => (Ty::Int, 1),
                    LiteralValue::Null => (Ty::Dyn, 1),
                };
                Est {
                    cost: 0,
                    ty,
                    size: Some(size),
                }
            }
            Expr::Ident(name) => {
                let (ty, size) = self.lookup(name).unwrap_or((Ty::Dyn, None));
                Est { cost: 1, ty, size }
            }
            Expr::Select(sel) => {
                let operand = self.cost(&sel.operand.expr);
                if sel.test {
                    return Est::new(operand.cost.saturating_add(1), Ty::Bool);
                }
                let (step, ty) = match &operand.ty {
                    Ty::Object(schema) => (
                        1,
                        schema["properties"].get(&sel.field).map_or(Ty::Dyn, ty_of),
                    ),
                    Ty::Map(_, v) => (1, (**v).clone()),
                    Ty::Dyn => (1, Ty::Dyn),
                    _ => (0, Ty::Dyn),
                };
                Est::new(operand.cost.saturating_add(step), ty)
            }
            Expr::List(list) => {
                let elements: Vec<Est> = list.elements.iter().map(|x| self.cost(&x.expr)).collect();
                let cost = elements
                    .iter()
                    .fold(10u64, |sum, x| sum.saturating_add(x.cost));
                let item = elements.first().map_or(Ty::Dyn, |x| x.ty.clone());
                let n = elements.len() as u64;
                Est {
                    cost,
                    ty: Ty::List(n, Box::new(item)),
                    size: Some(n),
                }
            }
            Expr::Map(map) => {
                let n = map.entries.len() as u64;
                Est {
                    cost: 30u64.saturating_add(n.saturating_mul(2)),
                    ty: Ty::Map(n, Box::new(Ty::Dyn)),
                    size: Some(n),
                }
            }
            Expr::Comprehension(c) => self.comprehension(c),
            Expr::Call(call) => {
                let target = call.target.as_ref().map(|t| self.cost(&t.expr));
                let args: Vec<Est> = call.args.iter().map(|a| self.cost(&a.expr)).collect();
                Self::call(&call.func_name, target.as_ref(), &args)
            }
            _ => Est::new(1, Ty::Dyn),
        }
    }

    fn comprehension(&mut self, c: &ComprehensionExpr) -> Est {
        let range = self.cost(&c.iter_range.expr);
        let init = self.cost(&c.accu_init.expr);
        let item = match &range.ty {
            Ty::List(_, t) => (**t).clone(),
            Ty::Map(..) => Ty::Str(MAX_REQUEST_BYTES - 2),
            _ => Ty::Dyn,
        };
        self.scopes
            .push((c.accu_var.clone(), init.ty.clone(), init.size));
        self.scopes.push((c.iter_var.clone(), item, None));
        let cond = self.cost(&c.loop_cond.expr);
        let step = self.cost(&c.loop_step.expr);
        self.scopes.pop();
        let result = self.cost(&c.result.expr);
        self.scopes.pop();
        let count = range.size();
        let cost = range
            .cost
            .saturating_add(init.cost)
            .saturating_add(result.cost)
            .saturating_add(count.saturating_mul(cond.cost.saturating_add(step.cost)));
        // A comprehension building a list (filter, map) is as long as its range.
        let size = matches!(init.ty, Ty::List(..) | Ty::Map(..)).then_some(count);
        Est {
            cost,
            ty: match init.ty {
                Ty::List(..) => Ty::List(count, Box::new(step_item(&step.ty))),
                other => other,
            },
            size,
        }
    }

    #[allow(clippy::too_many_lines)]
    fn call(name: &str, target: Option<&Est>, args: &[Est]) -> Est {
        let args_cost = args.iter().fold(0u64, |sum, a| sum.saturating_add(a.cost));
        let target_cost = target.map_or(0, |t| t.cost);
        let both = args_cost.saturating_add(target_cost);
        let arg = |i: usize| args.get(i).map_or(UNKNOWN, Est::size);
        let this = target.map_or(UNKNOWN, Est::size);
        let is_str = |e: Option<&Est>| matches!(e.map(|e| &e.ty), Some(Ty::Str(_)));
        match name {
            "_&&_" | "_||_" => Est::new(args_cost, Ty::Bool),
            "_?_:_" => {
                let (yes, no) = (&args[1], &args[2]);
                Est {
                    cost: args[0].cost.saturating_add(yes.cost.max(no.cost)),
                    ty: yes.ty.clone(),
                    size: Some(yes.size().max(no.size())),
                }
            }
            "_==_" | "_!=_" => Est::new(
                scaled(arg(0).min(arg(1)), STRING_TRAVERSAL).saturating_add(args_cost),
                Ty::Bool,
            ),
            "_<_" | "_<=_" | "_>_" | "_>=_" if is_str(args.first()) && is_str(args.get(1)) => {
                Est::new(
                    scaled(arg(0).min(arg(1)), STRING_TRAVERSAL).saturating_add(args_cost),
                    Ty::Bool,
                )
            }
            "_<_" | "_<=_" | "_>_" | "_>=_" | "!_" | "@not_strictly_false" => {
                Est::new(1u64.saturating_add(args_cost), Ty::Bool)
            }
            "_+_" => {
                let total = arg(0).saturating_add(arg(1));
                match &args[0].ty {
                    Ty::List(_, item) => Est {
                        cost: 1u64.saturating_add(args_cost),
                        ty: Ty::List(total, item.clone()),
                        size: Some(total),
                    },
                    Ty::Str(_) => Est {
                        cost: scaled(total, STRING_TRAVERSAL).saturating_add(args_cost),
                        ty: Ty::Str(total),
                        size: Some(total),
                    },
                    other => Est::new(1u64.saturating_add(args_cost), other.clone()),
                }
            }
            "_-_" | "_*_" | "_/_" | "_%_" | "-_" => {
                Est::new(1u64.saturating_add(args_cost), args[0].ty.clone())
            }
            "_[_]" => {
                let ty = match &args[0].ty {
                    Ty::List(_, t) | Ty::Map(_, t) => (**t).clone(),
                    _ => Ty::Dyn,
                };
                Est::new(1u64.saturating_add(args_cost), ty)
            }
            "@in" => Est::new(arg(1).saturating_add(args_cost), Ty::Bool),
            "size" | "int" | "uint" => Est::new(1u64.saturating_add(both), Ty::Int),
            "duration" => Est::new(1u64.saturating_add(both), Ty::Duration),
            "timestamp" => Est::new(1u64.saturating_add(both), Ty::Timestamp),
            "double" => Est::new(1u64.saturating_add(both), Ty::Double),
            "bool" => Est::new(1u64.saturating_add(both), Ty::Bool),
            "startsWith" | "endsWith" => Est::new(
                scaled(arg(0), STRING_TRAVERSAL).saturating_add(both),
                Ty::Bool,
            ),
            "contains" => Est::new(
                scaled(this, STRING_TRAVERSAL)
                    .saturating_mul(scaled(arg(0), STRING_TRAVERSAL))
                    .saturating_add(both),
                Ty::Bool,
            ),
            "matches" => {
                let (text, regex) = if target.is_some() {
                    (this, arg(0))
                } else {
                    (arg(0), arg(1))
                };
                Est::new(
                    scaled(text.saturating_add(1), STRING_TRAVERSAL)
                        .saturating_mul(scaled(regex, REGEX_LENGTH))
                        .saturating_add(both),
                    Ty::Bool,
                )
            }
            // The Kubernetes strings library: one scan of the receiver.
            "substring" | "lowerAscii" | "upperAscii" | "trim" | "replace" => Est {
                cost: scaled(this, STRING_TRAVERSAL).saturating_add(both),
                ty: Ty::Str(this),
                size: Some(this),
            },
            "charAt" | "indexOf" | "lastIndexOf" => {
                Est::new(scaled(this, STRING_TRAVERSAL).saturating_add(both), Ty::Int)
            }
            "split" => Est::new(
                scaled(this, STRING_TRAVERSAL).saturating_add(both),
                Ty::List(this, Box::new(Ty::Str(this))),
            ),
            "isURL" | "url" | "isIP" | "ip" | "isCIDR" | "cidr" | "isQuantity" | "quantity" => {
                Est::new(
                    scaled(arg(0), STRING_TRAVERSAL).saturating_add(both),
                    Ty::Dyn,
                )
            }
            "string" => Est::new(1u64.saturating_add(both), Ty::Str(arg(0))),
            _ => Est::new(1u64.saturating_add(both), Ty::Dyn),
        }
    }
}

/// The item type a list-building step adds (`accu + [x]`).
fn step_item(step: &Ty) -> Ty {
    match step {
        Ty::List(_, t) => (**t).clone(),
        _ => Ty::Dyn,
    }
}

/// The estimated maximum cost of one evaluation of `rule` on a value of `schema` (`self`),
/// or the parse error.
///
/// # Errors
/// The rule does not parse.
pub fn rule_cost(rule: &str, schema: &Value) -> Result<u64, String> {
    let program = Program::compile(rule).map_err(|e| e.to_string())?;
    let mut coster = Coster {
        scopes: vec![("self".to_owned(), ty_of(schema), None)],
    };
    Ok(coster.cost(&program.expression().expr).cost)
}

/// The API server's wording for a cost over `limit`.
pub fn over_budget(what: &str, cost: u64, limit: u64) -> String {
    #[allow(clippy::cast_precision_loss)]
    let factor = cost as f64 / limit as f64;
    let factor = if factor > 100.0 {
        "more than 100x".to_owned()
    } else if factor < 1.5 {
        format!("{factor:.6}x")
    } else {
        format!("{factor:.1}x")
    };
    format!(
        "{what} exceeds budget by factor of {factor} (try simplifying the rule, or adding maxItems, maxProperties, and maxLength where arrays, maps, and strings are declared)"
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn an_unbounded_list_of_strings_is_a_million_items() {
        let schema = json!({"type": "object", "properties": {
            "algorithms": {"type": "array", "items": {"type": "string"}},
            "jwks": {"type": "object", "properties": {"secretRef": {"type": "object", "properties": {}}}},
        }});
        let cost = rule_cost(
            "!self.algorithms.exists(a, a.startsWith('HS')) || has(self.jwks.secretRef)",
            &schema,
        )
        .unwrap();
        // (3 MiB - 2) / 3 items, each `@not_strictly_false(!r)` (3) and `r || a.startsWith` (3).
        assert_eq!(cost, 6_291_457);
        // Eight providers: the API server's "exceeds budget by factor of 5.0x".
        assert!(over_budget("estimated rule cost", cost * 8, RULE_LIMIT).contains("5.0x"));
    }

    #[test]
    fn bounds_make_it_cheap() {
        let schema = json!({"type": "object", "properties": {
            "algorithms": {"type": "array", "maxItems": 12, "items": {"type": "string", "maxLength": 5}},
        }});
        let cost = rule_cost("!self.algorithms.exists(a, a.startsWith('HS'))", &schema).unwrap();
        assert!(cost < 100, "{cost}");
    }

    #[test]
    fn string_scans_cost_a_tenth_per_character() {
        let schema =
            json!({"type": "object", "properties": {"i": {"type": "string", "maxLength": 500}}});
        // contains: ceil(500 * 0.1) * ceil(1 * 0.1) + the select (2).
        assert_eq!(rule_cost("self.i.contains('*')", &schema).unwrap(), 52);
        // matches: ceil(501 * 0.1) * ceil(4 * 0.25) + 2.
        assert_eq!(rule_cost("self.i.matches('^a+$')", &schema).unwrap(), 53);
        assert!(rule_cost("self.i.(", &schema).is_err());
    }
}
