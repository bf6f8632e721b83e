//! The OpenAPI 3 document of the admin API, served at
//! `/api/v1/admin/openapi.json`. Written by hand next to the handlers it
//! describes; a test checks that every route is in it.

use serde_json::{Value, json};

fn problem(description: &str) -> Value {
    json!({
        "description": description,
        "content": { "application/problem+json": { "schema": { "$ref": "#/components/schemas/Problem" } } }
    })
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
                "requestBody": { "required": false, "content": { "application/json": { "schema": {
                    "type": "object", "additionalProperties": false,
                    "properties": {
                        "trigger": { "type": "string", "enum": ["manual", "pre-migration"], "default": "manual" },
                        "labels": { "type": "object", "additionalProperties": { "type": "string" } }
                    } } } } },
                "responses": {
                    "202": { "description": "Started", "content": { "application/json": { "schema": {
                        "type": "object", "properties": {
                            "id": { "type": "string" }, "status": { "type": "string", "enum": ["running"] },
                            "status_url": { "type": "string" }, "repeated": { "type": "boolean" } } } } } },
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
                    "200": { "description": "A page", "content": { "application/json": { "schema": {
                        "type": "object", "properties": {
                            "items": { "type": "array", "items": { "$ref": "#/components/schemas/BackupItem" } },
                            "next_cursor": { "type": "string", "nullable": true } } } } } },
                    "400": problem("Malformed cursor or limit"), "401": problem("Missing or invalid token")
                } } },
            "/backups/{id}": {
                "get": {
                    "summary": "A backup's manifest and status (progress while running)",
                    "parameters": [id_param()],
                    "responses": {
                        "200": { "description": "Status", "content": { "application/json": { "schema": { "type": "object", "properties": {
                            "id": { "type": "string" }, "status": { "type": "string", "enum": ["complete", "running", "failed", "damaged"] },
                            "manifest": { "type": "object" }, "progress": { "type": "object" }, "error": { "type": "string" } } } } } },
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
                    "200": { "description": "The status", "content": { "application/json": { "schema": {
                        "type": "object", "required": ["status", "schedule_secs"],
                        "properties": {
                            "status": { "type": "string", "enum": ["ok", "failing", "overdue", "disabled"] },
                            "last_success": { "type": ["object", "null"] },
                            "last_failure": { "type": ["object", "null"] },
                            "next_scheduled": { "type": ["string", "null"], "format": "date-time" },
                            "last_verification": { "type": ["object", "null"] },
                            "schedule_secs": { "type": "integer" }
                        } } } } },
                    "401": problem("Missing or invalid token")
                }
            } },
            "/restore": { "post": {
                "summary": "Restore a backup (requires confirm: true); the host must restart afterwards",
                "requestBody": { "required": true, "content": { "application/json": { "schema": {
                    "type": "object", "required": ["backup_id"], "additionalProperties": false,
                    "properties": {
                        "backup_id": { "type": "string" }, "confirm": { "type": "boolean", "default": false },
                        "dry_run": { "type": "boolean", "default": false, "description": "check everything a restore would (compatibility, every hash, staged SQLite integrity and schema, YAML) and touch nothing" },
                        "plan_only": { "type": "boolean", "default": false, "description": "with dry_run: only compatibility and what would be replaced, without reading the content" },
                        "components": { "type": "array", "items": { "type": "string", "enum": ["persistence", "memory", "config", "checkpoints"] } }
                    } } } } },
                "responses": {
                    "200": { "description": "The restore report (restart_required: true)", "content": { "application/json": { "schema": { "type": "object" } } } },
                    "400": problem("Malformed id or body"), "401": problem("Missing or invalid token"), "404": problem("Unknown id"),
                    "409": problem("Another operation is running"), "413": problem("Body too large"),
                    "422": problem("Unconfirmed, incompatible or damaged"), "503": problem("Backups are disabled")
                } } },
            "/openapi.json": { "get": { "summary": "This document", "responses": { "200": { "description": "OpenAPI 3" } } } }
        },
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": {
                "Problem": { "type": "object", "properties": {
                    "type": { "type": "string" }, "title": { "type": "string" }, "status": { "type": "integer" },
                    "code": { "type": "string" }, "detail": { "type": "string" } } },
                "BackupItem": { "type": "object", "properties": {
                    "id": { "type": "string" }, "status": { "type": "string", "enum": ["complete", "running", "damaged"] },
                    "trigger": { "type": "string" }, "timestamp": { "type": "string", "format": "date-time" },
                    "size_bytes": { "type": "integer" }, "stored_bytes": { "type": "integer" },
                    "components": { "type": "array", "items": { "type": "string" } }, "pinned": { "type": "boolean" } } }
            }
        }
    })
}
