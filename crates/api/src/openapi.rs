//! The OpenAPI 3 document of the admin API, served at
//! `/api/v1/admin/openapi.json`. Written by hand next to the handlers it
//! describes; tests check that every route is in it and that every named
//! schema has exactly the fields of its `backup_core::wire` type.

use serde_json::{Value, json};

fn problem(description: &str) -> Value {
    json!({
        "description": description,
        "content": { "application/problem+json": { "schema": { "$ref": "#/components/schemas/Problem" } } }
    })
}

fn schema(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn body(name: &str) -> Value {
    json!({ "application/json": { "schema": schema(name) } })
}

fn id_param() -> Value {
    json!({ "name": "id", "in": "path", "required": true, "schema": { "type": "string", "example": "2026-03-15T14-30-00_manual" } })
}

/// The document.
pub fn document() -> Value {
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "SynthOrg backup admin API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Create, list, inspect, delete and restore SynthOrg backups. All endpoints need `Authorization: Bearer <token>`."
        },
        "servers": [{ "url": "/api/v1/admin" }],
        "security": [{ "bearer": [] }],
        "paths": {
            "/backup": { "post": {
                "summary": "Start a backup in the background",
                "parameters": [{ "name": "Idempotency-Key", "in": "header", "required": false, "schema": { "type": "string" },
                    "description": "A repeat with the same key returns the same backup id." }],
                "requestBody": { "required": false, "content": body("CreateRequest") },
                "responses": {
                    "202": { "description": "Started", "content": body("Started") },
                    "400": problem("Malformed body"), "401": problem("Missing or invalid token"),
                    "409": problem("Another operation is running"), "413": problem("Body too large"),
                    "503": problem("Backups are disabled")
                } } },
            "/backups": { "get": {
                "summary": "List backups, newest first",
                "parameters": [
                    { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": 1000, "default": 50 } },
                    { "name": "cursor", "in": "query", "schema": { "type": "string" }, "description": "next_cursor of the previous page" }
                ],
                "responses": {
                    "200": { "description": "A page", "content": body("ListPage") },
                    "400": problem("Malformed cursor or limit"), "401": problem("Missing or invalid token")
                } } },
            "/backups/{id}": {
                "get": {
                    "summary": "A backup's manifest and status (progress while running)",
                    "parameters": [id_param()],
                    "responses": {
                        "200": { "description": "Status", "content": body("BackupState") },
                        "400": problem("Malformed id"), "401": problem("Missing or invalid token"), "404": problem("Unknown id")
                    } },
                "delete": {
                    "summary": "Delete a backup",
                    "parameters": [id_param(), { "name": "force", "in": "query", "schema": { "type": "boolean", "default": false },
                        "description": "Required for pinned pre-migration backups" }],
                    "responses": {
                        "204": { "description": "Deleted" }, "400": problem("Malformed id"), "401": problem("Missing or invalid token"),
                        "404": problem("Unknown id"), "409": problem("Pinned without force, or another operation is running")
                    } } },
            "/status": { "get": {
                "summary": "Backup health: ok | failing | overdue | disabled, the last success, failure and verification, the next scheduled backup",
                "responses": {
                    "200": { "description": "The status", "content": body("StatusReport") },
                    "401": problem("Missing or invalid token")
                }
            } },
            "/restore": { "post": {
                "summary": "Restore a backup (requires confirm: true); the host must restart afterwards",
                "requestBody": { "required": true, "content": body("RestoreRequest") },
                "responses": {
                    "200": { "description": "The restore report (restart_required: true)", "content": body("RestoreReport") },
                    "400": problem("Malformed id or body"), "401": problem("Missing or invalid token"), "404": problem("Unknown id"),
                    "409": problem("Another operation is running"), "413": problem("Body too large"),
                    "422": problem("Unconfirmed, incompatible or damaged"), "503": problem("Backups are disabled")
                } } },
            "/openapi.json": { "get": { "summary": "This document", "responses": { "200": { "description": "OpenAPI 3" } } } }
        },
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": {
                "Problem": { "type": "object", "required": ["type", "title", "status", "code", "detail"], "properties": {
                    "type": { "type": "string" }, "title": { "type": "string" }, "status": { "type": "integer" },
                    "code": { "type": "string" }, "detail": { "type": "string" },
                    "compatibility": { "type": "object", "description": "the findings (code incompatible only)" } } },
                "CreateRequest": { "type": "object", "additionalProperties": false, "properties": {
                    "trigger": { "type": "string", "enum": ["manual", "pre-migration"], "default": "manual" },
                    "labels": { "type": "object", "additionalProperties": { "type": "string" } } } },
                "Started": { "type": "object", "required": ["id", "status", "status_url", "repeated"], "properties": {
                    "id": { "type": "string" }, "status": { "type": "string", "enum": ["running", "complete", "failed", "damaged"] },
                    "status_url": { "type": "string" }, "repeated": { "type": "boolean" } } },
                "ListPage": { "type": "object", "required": ["items", "next_cursor"], "properties": {
                    "items": { "type": "array", "items": schema("BackupItem") },
                    "next_cursor": { "type": "string", "nullable": true } } },
                "BackupItem": { "type": "object", "required": ["id", "status", "trigger", "timestamp"], "properties": {
                    "id": { "type": "string" }, "status": { "type": "string", "enum": ["complete", "running", "damaged"] },
                    "trigger": { "type": "string" }, "timestamp": { "type": "string", "format": "date-time" },
                    "size_bytes": { "type": "integer" }, "stored_bytes": { "type": "integer" },
                    "components": { "type": "array", "items": { "type": "string" } },
                    "absent": { "type": "array", "items": { "type": "string" }, "description": "components whose source did not exist" },
                    "compression": { "type": "string", "enum": ["gzip", "zstd", "none"] },
                    "pinned": { "type": "boolean" }, "reason": { "type": "string", "description": "why it is damaged" },
                    "encrypted": { "type": "boolean" },
                    "recipients": { "type": "array", "items": { "type": "string" }, "description": "public keys it is encrypted to" },
                    "progress": { "type": "object", "description": "running backups" } } },
                "BackupState": { "type": "object", "required": ["id", "status"], "properties": {
                    "id": { "type": "string" }, "status": { "type": "string", "enum": ["complete", "running", "failed", "damaged"] },
                    "manifest": { "type": "object" }, "progress": { "type": "object" }, "error": { "type": "string" } } },
                "RestoreRequest": { "type": "object", "required": ["backup_id"], "additionalProperties": false, "properties": {
                    "backup_id": { "type": "string" }, "confirm": { "type": "boolean", "default": false },
                    "dry_run": { "type": "boolean", "default": false, "description": "check everything a restore would (compatibility, every hash, staged SQLite integrity and schema, YAML) and touch nothing" },
                    "plan_only": { "type": "boolean", "default": false, "description": "with dry_run: only compatibility and what would be replaced, without reading the content" },
                    "components": { "type": "array", "items": { "type": "string", "enum": ["persistence", "memory", "config", "checkpoints"] } } } },
                "RestoreReport": { "type": "object", "properties": {
                    "id": { "type": "string" }, "dry_run": { "type": "boolean" },
                    "components": { "type": "array", "items": { "type": "object" }, "description": "what is (or would be) replaced: component, live_path, files, bytes" },
                    "bytes": { "type": "integer" }, "compatibility": { "type": "object" },
                    "warnings": { "type": "array", "items": { "type": "string" } },
                    "safety_backup_id": { "type": "string", "nullable": true },
                    "safety_backup_path": { "type": "string", "description": "where the safety backup's files are on the restoring machine, when it is the replaced items moved into a directory (with S3: the local pool at backup.path); absent otherwise" },
                    "restart_required": { "type": "boolean" } } },
                "StatusReport": { "type": "object", "required": ["status", "schedule_secs"], "properties": {
                    "status": { "type": "string", "enum": ["ok", "failing", "overdue", "disabled"] },
                    "last_success": { "type": "object", "nullable": true },
                    "last_failure": { "type": "object", "nullable": true },
                    "next_scheduled": { "type": "string", "format": "date-time", "nullable": true },
                    "last_verification": { "type": "object", "nullable": true },
                    "schedule_secs": { "type": "integer" },
                    "warnings": { "type": "array", "items": { "type": "string" }, "description": "e.g. an identity that cannot decrypt new backups or the newest one" } } }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::{BTreeMap, BTreeSet};

    use backup_core::conformance::manifest_for;
    use backup_core::service::{Phase, Progress};
    use backup_core::status::{Health, StatusReport};
    use backup_core::wire::{
        BackupState, CreateRequest, ListItem, ListPage, Problem, RestoreRequest, Started,
    };
    use backup_core::{BackupId, Component, Compression, RestoreReport};
    use serde::Serialize;

    use super::document;

    fn id() -> BackupId {
        BackupId::parse("2027-01-15T08-00-00_manual").unwrap()
    }

    /// The field names a fully populated value serializes with.
    fn fields(value: &impl Serialize) -> BTreeSet<String> {
        let v = serde_json::to_value(value).unwrap();
        v.as_object().unwrap().keys().cloned().collect()
    }

    fn progress() -> Progress {
        Progress {
            id: id(),
            phase: Phase::Verify,
            bytes_done: 1,
            bytes_total: 2,
            files_done: 1,
            files_total: 2,
        }
    }

    #[test]
    fn every_named_schema_has_exactly_the_fields_of_its_wire_type() {
        let manifest = manifest_for(&id(), Some(b"x"), b"y");
        let item = ListItem {
            absent: vec![Component::Memory],
            reason: Some("x".into()),
            progress: Some(progress()),
            size_bytes: Some(1),
            stored_bytes: Some(1),
            components: Some(vec![Component::Config]),
            compression: Some(Compression::Gzip),
            pinned: Some(false),
            encrypted: true,
            recipients: vec!["age1x".into()],
            ..ListItem::running(&id(), None)
        };
        let mut problem = Problem::new(422, "Unprocessable Entity", "incompatible", "x".into());
        problem.compatibility = Some(backup_core::CompatReport::default());
        let samples: BTreeMap<&str, BTreeSet<String>> = BTreeMap::from([
            ("Problem", fields(&problem)),
            (
                "CreateRequest",
                fields(&CreateRequest {
                    trigger: Some("manual".into()),
                    labels: BTreeMap::new(),
                }),
            ),
            (
                "Started",
                fields(&Started {
                    id: id(),
                    status: "running".into(),
                    status_url: "/x".into(),
                    repeated: false,
                }),
            ),
            (
                "ListPage",
                fields(&ListPage {
                    items: vec![],
                    next_cursor: None,
                }),
            ),
            ("BackupItem", fields(&item)),
            (
                "BackupState",
                fields(&BackupState {
                    id: id(),
                    status: "complete".into(),
                    manifest: Some(Box::new(manifest)),
                    progress: Some(progress()),
                    error: Some("x".into()),
                }),
            ),
            (
                "RestoreRequest",
                fields(&RestoreRequest {
                    components: Some(vec![Component::Config]),
                    ..RestoreRequest::default()
                }),
            ),
            (
                "RestoreReport",
                fields(&RestoreReport {
                    id: id(),
                    dry_run: true,
                    components: vec![],
                    bytes: 0,
                    compatibility: backup_core::CompatReport::default(),
                    warnings: vec![],
                    safety_backup_id: None,
                    safety_backup_path: Some(String::new()),
                    restart_required: false,
                }),
            ),
            (
                "StatusReport",
                fields(&StatusReport {
                    status: Health::Ok,
                    last_success: None,
                    last_failure: None,
                    next_scheduled: None,
                    last_verification: None,
                    schedule_secs: 1,
                    warnings: vec!["x".into()],
                }),
            ),
        ]);
        let doc = document();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        let named: BTreeSet<&str> = schemas.keys().map(String::as_str).collect();
        assert_eq!(
            named,
            samples.keys().copied().collect(),
            "every schema is checked"
        );
        for (name, want) in &samples {
            let props: BTreeSet<String> = schemas[*name]["properties"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect();
            assert_eq!(&props, want, "schema {name} vs its wire type");
            for required in schemas[*name]["required"].as_array().into_iter().flatten() {
                assert!(
                    want.contains(required.as_str().unwrap()),
                    "{name}: {required}"
                );
            }
        }
    }
}
