//! `/openapi.json`: an OpenAPI 3.1 document built from the gateway's route
//! table ([`super::routes`], which also builds the router) and from the Rust
//! types the handlers decode and encode.
//!
//! Request bodies, response data and query strings derive utoipa's
//! `ToSchema` / `IntoParams`, with their bounds written as attributes beside
//! the fields; a field added, renamed or retyped changes the document with
//! it. What no derive can say is stated here, once: the success envelope,
//! the error envelopes, the statuses each kind of route answers and the
//! security scheme. schemathesis (`scripts/clients`) checks every answer of
//! the running service against this document.

use std::{borrow::Cow, collections::BTreeMap};

use utoipa::{
    IntoParams, ToSchema,
    openapi::{
        ArrayBuilder, Components, ComponentsBuilder, ContentBuilder, HttpMethod, InfoBuilder,
        ObjectBuilder, OpenApi, OpenApiBuilder, PathItem, Paths, Ref, RefOr, Required,
        ResponseBuilder, Responses, Schema, Type,
        header::HeaderBuilder,
        path::{OperationBuilder, Parameter, ParameterBuilder, ParameterIn},
        request_body::RequestBodyBuilder,
        schema::{AnyOfBuilder, SchemaFormat, SchemaType},
        security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme},
    },
};

/// Who may call a REST route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Public,
    User,
    Admin,
}

/// A Rust type's place in the document: its component name, its schema,
/// and the components it refers to. A *variant* is the same type shown
/// under another name with more fields required or some left out (a
/// creation body is its update body with the fields a creation needs
/// required).
#[derive(Clone, Copy)]
pub struct TypeDoc {
    name: fn() -> Cow<'static, str>,
    schema: fn() -> RefOr<Schema>,
    refs: fn(&mut Vec<(String, RefOr<Schema>)>),
    variant: Option<Variant>,
}

#[derive(Clone, Copy)]
struct Variant {
    name: &'static str,
    required: &'static [&'static str],
    omitted: &'static [&'static str],
}

impl TypeDoc {
    pub fn of<T: ToSchema>() -> Self {
        Self {
            name: T::name,
            schema: T::schema,
            refs: T::schemas,
            variant: None,
        }
    }

    fn name(&self) -> String {
        match self.variant {
            Some(v) => v.name.to_owned(),
            None => (self.name)().into_owned(),
        }
    }

    fn reference(&self) -> RefOr<Schema> {
        RefOr::Ref(Ref::from_schema_name(self.name()))
    }

    /// This type's schema and every schema it refers to, by name.
    fn components(&self, into: &mut BTreeMap<String, RefOr<Schema>>) {
        let mut schema = (self.schema)();
        if let (Some(v), RefOr::T(Schema::Object(object))) = (self.variant, &mut schema) {
            for field in v.omitted {
                object.properties.shift_remove(*field);
                object.required.retain(|r| r != field);
            }
            for field in v.required {
                if !object.required.iter().any(|r| r == field) {
                    object.required.push((*field).to_owned());
                }
                // A required field cannot be null.
                if let Some(RefOr::T(Schema::Object(property))) = object.properties.get_mut(*field)
                {
                    not_null(property);
                }
            }
        }
        into.insert(self.name(), schema);
        let mut refs = Vec::new();
        (self.refs)(&mut refs);
        into.extend(refs);
    }
}

/// `property` without `null` among its types and values.
fn not_null(property: &mut utoipa::openapi::schema::Object) {
    if let SchemaType::Array(types) = &property.schema_type {
        let mut types: Vec<Type> = types
            .iter()
            .filter(|t| **t != Type::Null)
            .cloned()
            .collect();
        property.schema_type = match types.len() {
            1 => SchemaType::Type(types.remove(0)),
            _ => SchemaType::Array(types),
        };
    }
    if let Some(values) = &mut property.enum_values {
        values.retain(|v| !v.is_null());
    }
}

/// What a success answers.
#[derive(Clone, Copy)]
enum Answer {
    /// `{"success": true, "data": T}`.
    Data(TypeDoc),
    /// `{"success": true, "data": [T]}`.
    List(TypeDoc),
    /// `{"success": true, "data": [T], "pagination": …}`.
    Page(TypeDoc),
    /// `T` itself, not in the envelope (the seeds' own shapes).
    Bare(TypeDoc),
    /// Not JSON of this API (probes, metrics, this document): never
    /// refused for overload, no error envelope.
    Operational,
}

/// What a request carries as its body.
#[derive(Clone, Copy)]
enum Body {
    None,
    Json(TypeDoc),
    /// Raw bytes taken as they come (webhooks: the signature covers them).
    Raw,
}

/// What the OpenAPI document says of one route.
#[derive(Clone)]
pub struct RouteDoc {
    pub method: &'static str,
    /// axum and OpenAPI share the `{param}` syntax.
    pub path: &'static str,
    pub summary: &'static str,
    pub access: Access,
    pub tag: &'static str,
    /// The query string: each type a handler parses part of it into.
    query: Vec<fn() -> Vec<Parameter>>,
    body: Body,
    answer: Answer,
    /// Statuses beyond the ones every route of its kind can answer, each
    /// with the error codes it carries.
    errors: &'static [(u16, &'static str)],
    /// Errors in seed 003's `{"error": CODE}` shape, a bad token as 402.
    seed_errors: bool,
}

impl RouteDoc {
    pub fn new(
        method: &'static str,
        path: &'static str,
        summary: &'static str,
        access: Access,
        tag: &'static str,
    ) -> Self {
        Self {
            method,
            path,
            summary,
            access,
            tag,
            query: Vec::new(),
            body: Body::None,
            answer: Answer::Operational,
            errors: &[],
            seed_errors: false,
        }
    }

    /// Statuses this route answers beyond the common ones.
    pub fn errors(mut self, errors: &'static [(u16, &'static str)]) -> Self {
        self.errors = errors;
        self
    }

    /// Errors as `{"error": CODE}`, a missing or bad token as 402.
    pub fn seed_errors(mut self) -> Self {
        self.seed_errors = true;
        self
    }

    /// Parameters of the query string, as the type the handler parses
    /// them into.
    pub fn query<Q: IntoParams>(mut self) -> Self {
        self.query
            .push(|| Q::into_params(|| Some(ParameterIn::Query)));
        self
    }

    /// A JSON request body of type `T`.
    pub fn body<T: ToSchema>(mut self) -> Self {
        self.body = Body::Json(TypeDoc::of::<T>());
        self
    }

    /// A JSON request body of type `T`, shown as `name` with the fields
    /// `required` required and the fields `omitted` left out.
    pub fn body_variant<T: ToSchema>(
        mut self,
        name: &'static str,
        required: &'static [&'static str],
        omitted: &'static [&'static str],
    ) -> Self {
        let mut doc = TypeDoc::of::<T>();
        doc.variant = Some(Variant {
            name,
            required,
            omitted,
        });
        self.body = Body::Json(doc);
        self
    }

    /// A request body taken as raw bytes (webhooks).
    pub fn raw_body(mut self) -> Self {
        self.body = Body::Raw;
        self
    }

    /// `data` of the success envelope is a `T`.
    pub fn data<T: ToSchema>(mut self) -> Self {
        self.answer = Answer::Data(TypeDoc::of::<T>());
        self
    }

    /// `data` is an array of `T`.
    pub fn list<T: ToSchema>(mut self) -> Self {
        self.answer = Answer::List(TypeDoc::of::<T>());
        self
    }

    /// `data` is a page of `T`, with `pagination` beside it.
    pub fn page<T: ToSchema>(mut self) -> Self {
        self.answer = Answer::Page(TypeDoc::of::<T>());
        self
    }

    /// The answer is a `T`, not in the envelope.
    pub fn bare<T: ToSchema>(mut self) -> Self {
        self.answer = Answer::Bare(TypeDoc::of::<T>());
        self
    }

    /// A probe, a metrics page or a document: no envelope, never refused.
    pub fn operational(mut self) -> Self {
        self.answer = Answer::Operational;
        self
    }

    fn types(&self) -> impl Iterator<Item = TypeDoc> {
        let body = match self.body {
            Body::Json(t) => Some(t),
            Body::None | Body::Raw => None,
        };
        let answer = match self.answer {
            Answer::Data(t) | Answer::List(t) | Answer::Page(t) | Answer::Bare(t) => Some(t),
            Answer::Operational => None,
        };
        body.into_iter().chain(answer)
    }
}

/// `false`, the only value (the error envelope's `success`).
pub fn false_only() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::Boolean)
        .enum_values(Some([false]))
}

/// `true`, the only value (a success's `success`).
pub fn true_only() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::Boolean)
        .enum_values(Some([true]))
}

/// A string that is one of `values`; `null` allowed when `nullable`.
pub fn one_of(values: impl IntoIterator<Item = &'static str>, nullable: bool) -> ObjectBuilder {
    let mut values: Vec<Option<&'static str>> = values.into_iter().map(Some).collect();
    if nullable {
        values.push(None);
    }
    ObjectBuilder::new()
        .schema_type(or_null(Type::String, nullable))
        .enum_values(Some(values))
}

/// Credits as a JSON number with up to 6 decimals, other than 0, at most
/// 10^12 either way.
pub fn nonzero_credits() -> AnyOfBuilder {
    let max = MAX_CREDITS;
    let side = || {
        ObjectBuilder::new()
            .schema_type(Type::Number)
            .multiple_of(Some(0.000001))
    };
    AnyOfBuilder::new()
        .item(side().exclusive_minimum(Some(0)).maximum(Some(max)))
        .item(side().minimum(Some(-max)).exclusive_maximum(Some(0)))
        .description(Some(
            "Credits, up to 6 decimals; positive grants, negative debits; never 0",
        ))
}

/// `kind`, or `kind` and `null` when `nullable`.
fn or_null(kind: Type, nullable: bool) -> SchemaType {
    if nullable {
        SchemaType::from_iter([kind, Type::Null])
    } else {
        SchemaType::Type(kind)
    }
}

/// An absolute http(s) URL (blank counts as not given where the field is
/// optional); `null` allowed when `nullable`.
pub fn url(nullable: bool) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(or_null(Type::String, nullable))
        .format(Some(SchemaFormat::Custom("uri".to_owned())))
        .max_length(Some(2048))
        .pattern(Some(r"^https?://\S+$"))
}

/// Credits as a JSON number with up to 6 decimals, from 0 to 10^12;
/// `null` allowed when `nullable` (the field is then as if not given).
pub fn credits_at_least_0(nullable: bool) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(or_null(Type::Number, nullable))
        .minimum(Some(0))
        .maximum(Some(MAX_CREDITS))
        .multiple_of(Some(0.000001))
        .description(Some("Credits, up to 6 decimals"))
}

/// The most credits one amount or balance may hold.
const MAX_CREDITS: i64 = crate::ledger::model::MAX_MICROS / crate::domain::MICROS_PER_CREDIT;

fn json_content(schema: impl Into<RefOr<Schema>>) -> utoipa::openapi::Content {
    ContentBuilder::new().schema(Some(schema)).build()
}

fn envelope(data: RefOr<Schema>, paged: bool) -> Schema {
    let mut object = ObjectBuilder::new()
        .schema_type(Type::Object)
        .property("success", true_only())
        .required("success")
        .property("data", data)
        .required("data");
    if paged {
        object = object
            .property("pagination", Ref::from_schema_name("Pagination"))
            .required("pagination");
    }
    object.build().into()
}

fn array_of(t: &TypeDoc) -> RefOr<Schema> {
    ArrayBuilder::new().items(t.reference()).build().into()
}

fn path_parameters(path: &str) -> Vec<Parameter> {
    path.split('/')
        .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(|name| {
            ParameterBuilder::new()
                .name(name)
                .parameter_in(ParameterIn::Path)
                .required(Required::True)
                .schema(Some(
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .min_length(Some(1))
                        .max_length(Some(64)),
                ))
                .build()
        })
        .collect()
}

fn error_response(schema: &str, description: &str) -> ResponseBuilder {
    ResponseBuilder::new().description(description).content(
        "application/json",
        json_content(Ref::from_schema_name(schema)),
    )
}

fn responses(doc: &RouteDoc) -> Responses {
    let body: Option<RefOr<Schema>> = match doc.answer {
        Answer::Data(t) => Some(envelope(t.reference(), false).into()),
        Answer::List(t) => Some(envelope(array_of(&t), false).into()),
        Answer::Page(t) => Some(envelope(array_of(&t), true).into()),
        Answer::Bare(t) => Some(t.reference()),
        Answer::Operational => None,
    };
    let ok = ResponseBuilder::new().description("OK");
    let ok = match body {
        Some(schema) => ok.content("application/json", json_content(schema)),
        None => ok,
    };
    let own = if doc.seed_errors {
        "SeedError"
    } else {
        "Error"
    };
    // Each error status with its schema and what it means; a status two
    // rules can answer says both.
    let mut errors: BTreeMap<u16, (&str, String)> = BTreeMap::new();
    let mut add = |status: u16, schema: &'static str, description: &str| {
        errors
            .entry(status)
            .and_modify(|(_, d)| {
                d.push_str("; ");
                d.push_str(description);
            })
            .or_insert((schema, description.to_owned()));
    };
    match doc.answer {
        Answer::Data(_) | Answer::List(_) | Answer::Page(_) | Answer::Bare(_) => {
            add(
                400,
                own,
                "INVALID_ARGUMENT: invalid input (the message names the field), or a failed business rule",
            );
            add(500, own, "INTERNAL: internal error");
            add(
                503,
                own,
                "UNAVAILABLE: the database or a payment provider is unreachable, or the service is shutting down; retry",
            );
            // The overload guard answers before any route, in the envelope.
            add(
                429,
                "Error",
                "RESOURCE_EXHAUSTED: the server is answering as many requests as it may; retry after Retry-After seconds",
            );
            add(
                504,
                "Error",
                "TIMEOUT: not answered within the server's REQUEST_TIMEOUT_SECONDS",
            );
        }
        // Never refused for overload.
        Answer::Operational => {}
    }
    let too_large = format!(
        "PAYLOAD_TOO_LARGE: the body is over {} MiB",
        super::MAX_BODY_BYTES >> 20
    );
    match doc.body {
        Body::Json(_) => {
            add(413, "Error", &too_large);
            add(
                415,
                "Error",
                "UNSUPPORTED_MEDIA_TYPE: the body is not sent as application/json",
            );
        }
        Body::Raw => add(413, "Error", &too_large),
        Body::None => {}
    }
    match doc.access {
        Access::Public => {}
        Access::User | Access::Admin => {
            if doc.seed_errors {
                add(
                    402,
                    own,
                    "INVALID_API_KEY: missing, invalid or expired token",
                );
            } else {
                add(401, own, "UNAUTHORIZED: missing, invalid or expired token");
            }
            add(
                403,
                own,
                "FORBIDDEN: the token's role may not call this route",
            );
        }
    }
    for (status, codes) in doc.errors {
        add(*status, own, codes);
    }
    let mut responses = vec![("200".to_owned(), ok.build())];
    for (status, (schema, description)) in errors {
        let mut response = error_response(schema, &description);
        if status == 429 {
            let retry_after = HeaderBuilder::new()
                .schema(Some(
                    ObjectBuilder::new()
                        .schema_type(Type::Integer)
                        .minimum(Some(1)),
                ))
                .description(Some("Seconds to wait"))
                .build();
            response = response.header("Retry-After", retry_after);
        }
        responses.push((status.to_string(), response.build()));
    }
    utoipa::openapi::ResponsesBuilder::new()
        .responses_from_iter(responses)
        .build()
}

fn operation(doc: &RouteDoc) -> utoipa::openapi::path::Operation {
    let id: String = format!("{} {}", doc.method.to_lowercase(), doc.path)
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let mut parameters = path_parameters(doc.path);
    for query in &doc.query {
        parameters.extend(query());
    }
    let mut op = OperationBuilder::new()
        .summary(Some(doc.summary))
        .tag(doc.tag)
        .operation_id(Some(id))
        .responses(responses(doc));
    if !parameters.is_empty() {
        op = op.parameters(Some(parameters));
    }
    let body = match doc.body {
        Body::Json(t) => Some(t.reference()),
        Body::Raw => Some(
            ObjectBuilder::new()
                .schema_type(Type::Object)
                .build()
                .into(),
        ),
        Body::None => None,
    };
    if let Some(schema) = body {
        op = op.request_body(Some(
            RequestBodyBuilder::new()
                .required(Some(Required::True))
                .content("application/json", json_content(schema))
                .build(),
        ));
    }
    match doc.access {
        Access::Public => {}
        Access::User | Access::Admin => {
            op = op.security(SecurityRequirement::new("bearerAuth", Vec::<String>::new()));
        }
    }
    op.build()
}

fn http_method(method: &str) -> Option<HttpMethod> {
    match method {
        "GET" => Some(HttpMethod::Get),
        "POST" => Some(HttpMethod::Post),
        "PUT" => Some(HttpMethod::Put),
        "DELETE" => Some(HttpMethod::Delete),
        "PATCH" => Some(HttpMethod::Patch),
        _ => None,
    }
}

fn components(routes: &[RouteDoc]) -> Components {
    let mut schemas = BTreeMap::new();
    for t in [
        TypeDoc::of::<super::envelope::ErrorBody>(),
        TypeDoc::of::<super::credits::SeedErrorJson>(),
        TypeDoc::of::<super::Pagination>(),
    ] {
        t.components(&mut schemas);
    }
    for route in routes {
        for t in route.types() {
            t.components(&mut schemas);
        }
    }
    ComponentsBuilder::new()
        .schemas_from_iter(schemas)
        .security_scheme(
            "bearerAuth",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        )
        .build()
}

/// The whole document for `routes`.
pub fn document(routes: &[RouteDoc]) -> OpenApi {
    let mut paths = Paths::new();
    for doc in routes {
        if let Some(method) = http_method(doc.method) {
            let item = PathItem::new(method, operation(doc));
            match paths.paths.get_mut(doc.path) {
                Some(existing) => existing.merge_operations(item),
                None => {
                    paths.paths.insert(doc.path.to_owned(), item);
                }
            }
        }
    }
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("Billing service REST gateway")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "Credits, packs, subscriptions, check-in and payments. Every route is a translation of a billing.v1 gRPC call.",
                )),
        )
        .paths(paths)
        .components(Some(components(routes)))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overload::{Protocol, Rest};

    /// A route left without a declared answer would be documented as a
    /// probe: only the routes the overload guard never refuses may be.
    #[test]
    fn only_never_refused_routes_are_operational() {
        for (doc, _) in super::super::routes() {
            let operational = matches!(doc.answer, Answer::Operational);
            let exempt = <Rest as Protocol<axum::body::Body>>::exempt(doc.path);
            assert_eq!(operational, exempt, "{} {}", doc.method, doc.path);
        }
    }

    #[test]
    fn a_creation_variant_requires_its_fields_and_refuses_null_for_them() {
        let routes: Vec<RouteDoc> = super::super::routes().into_iter().map(|(d, _)| d).collect();
        let doc = serde_json::to_value(document(&routes)).expect("serializes");
        let plan = &doc["components"]["schemas"]["PlanCreateBody"];
        assert_eq!(plan["required"], serde_json::json!(["code", "name"]));
        assert_eq!(plan["properties"]["code"]["type"], "string");
        assert_eq!(
            plan["properties"]["description"]["type"],
            serde_json::json!(["string", "null"])
        );
        let rate = &doc["components"]["schemas"]["RateCreateBody"];
        assert_eq!(
            rate["properties"]["meter"]["enum"],
            serde_json::json!(["storage_egress", "ai_tokens"])
        );
        let update = &doc["components"]["schemas"]["RateUpdateBody"]["properties"];
        assert!(update.get("meter").is_none() && update.get("model").is_none());
    }

    #[test]
    fn every_reference_names_a_component() {
        let routes: Vec<RouteDoc> = super::super::routes().into_iter().map(|(d, _)| d).collect();
        let doc = serde_json::to_value(document(&routes)).expect("serializes");
        let text = doc.to_string();
        for reference in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = reference.split('"').next().unwrap_or_default();
            assert!(
                doc["components"]["schemas"].get(name).is_some(),
                "no component {name}"
            );
        }
    }
}
