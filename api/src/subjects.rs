//! Erasure of a data subject (crypto-shredding), for admins.

use std::sync::Arc;

use audit_ledger::store::system::erase_subject;
use chrono::{DateTime, Utc};
use poem::web::Data;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi};
use uuid::Uuid;

use crate::auth::{BearerAuth, Role};
use crate::body::{OptionalJson, Text};
use crate::disclose::store_error;
use crate::problem::ApiError;
use crate::state::ApiState;
use crate::ApiTags;

/// Longest accepted erasure reason.
const MAX_REASON_CHARS: usize = 1000;

/// Why a subject is erased.
#[derive(Debug, Clone, Object)]
pub struct EraseRequest {
    /// For example the erasure request's ticket; stored in the erasure event.
    #[oai(validator(min_length = 1, max_length = 1000))]
    pub reason: Text,
}

/// The erasure of a data subject.
#[derive(Debug, Clone, Object)]
pub struct ErasureView {
    pub subject_id: String,
    /// The `audit.subject_erased` event in the system chain.
    pub event_id: Uuid,
    pub erased_at: DateTime<Utc>,
    /// The destroyed data key (null if the subject never had one).
    #[oai(nullable)]
    pub key_id: Option<Uuid>,
    /// True when the subject had been erased before: nothing was done now.
    pub already_erased: bool,
}

pub struct SubjectsApi;

#[OpenApi]
impl SubjectsApi {
    /// Erase a data subject: destroy its data key so its protected fields
    /// can never be decrypted again, and record the erasure as an
    /// `audit.subject_erased` event. Irreversible; erasing again returns the
    /// first erasure. The reason comes from the JSON body `{"reason": …}` or
    /// the `reason` query parameter.
    #[oai(
        path = "/v1/subjects/:subject_id",
        method = "delete",
        tag = "ApiTags::Subjects",
        operation_id = "erase_subject"
    )]
    async fn erase(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<ApiState>>,
        /// The data subject's id (the events' `subject_id`).
        subject_id: Path<String>,
        /// Why (when no JSON body is sent).
        #[oai(validator(min_length = 1))]
        reason: Query<Option<String>>,
        body: OptionalJson<EraseRequest>,
    ) -> Result<Json<ErasureView>, ApiError> {
        let caller = auth.0;
        caller.require(Role::Admin, "erasing a data subject")?;
        let subject_id = subject_id.0;
        let reason = body
            .0
            .map(|b| b.reason.into_string())
            .or(reason.0)
            .map(|r| r.trim().to_owned())
            .filter(|r| !r.is_empty())
            .ok_or_else(|| {
                ApiError::bad_request(
                    "a reason is required: send {\"reason\": \"GDPR request #123\"} as the JSON body, or ?reason=…",
                )
            })?;
        if reason.chars().count() > MAX_REASON_CHARS || reason.chars().any(char::is_control) {
            return Err(ApiError::bad_request(format!(
                "the reason must be at most {MAX_REASON_CHARS} characters of printable text"
            )));
        }
        if subject_id.trim().is_empty() || subject_id.chars().any(char::is_control) {
            return Err(ApiError::bad_request(
                "the subject id must be non-empty printable text (the events' subject_id)",
            ));
        }
        let erased_by = format!("api:{}", caller.name);
        let (erasure, head) = erase_subject(state.pool(), &subject_id, &reason, &erased_by)
            .await
            .map_err(|e| store_error(e, "erasing a data subject"))?;
        // This node's writer must not reuse a cached key of the subject.
        if let Some(protection) = state.protection() {
            protection
                .keyring()
                .evict(std::slice::from_ref(&subject_id));
        }
        if let Some(head) = head {
            state.observe_system_head(&head).await;
        }
        tracing::info!(
            subject_id = %subject_id,
            actor = %caller.name,
            event_id = %erasure.event_id,
            already_erased = erasure.already_erased,
            "data subject erased"
        );
        Ok(Json(ErasureView {
            subject_id: erasure.subject_id,
            event_id: erasure.event_id,
            erased_at: erasure.erased_at,
            key_id: erasure.key_id,
            already_erased: erasure.already_erased,
        }))
    }
}
