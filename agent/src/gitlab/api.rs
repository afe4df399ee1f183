//! The runner API's calls, one method each on `Client`: what each sends (the token in the body,
//! or PRIVATE-TOKEN for `/user/runners`) and what its answer must hold. Each returns a `Call`,
//! which carries its endpoint so that `with_retries` knows how it may be retried.

use std::future::{Future, IntoFuture};

use serde::Deserialize;
use serde_json::{Value, json};

use super::client::Request;
use super::{ApiError, Client, Endpoint};
use crate::config::{Executor, RunnerSettings, RunnerType};
use crate::secret::Secret;

#[derive(Debug, Clone)]
pub struct CreatedRunner {
    pub id: Option<u64>,
    pub token: Secret,
    /// See `token_expires_at`.
    pub token_expires_at: Option<String>,
}

/// `token_expires_at` of a verify or create answer, as GitLab wrote it: None when it is null
/// or absent (the token does not expire); anything that is not a string as its JSON text, to
/// be reported as unreadable.
pub fn token_expires_at(answer: &Value) -> Option<String> {
    match answer.get("token_expires_at")? {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deletion {
    Deleted,
    /// 403 or 404: the runner or manager is unknown, i.e. already gone (or its token expired,
    /// which leaves nothing for us to delete either).
    AlreadyGone,
}

/// What this VM tells GitLab about itself; the same fields gitlab-runner sends.
#[derive(Debug, Clone)]
pub struct RunnerInfo {
    pub name: String,
    pub executor: Executor,
}

impl RunnerInfo {
    fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "version": concat!("gitlab-runner-vm ", env!("CARGO_PKG_VERSION")),
            "platform": std::env::consts::OS,
            "architecture": std::env::consts::ARCH,
            "executor": self.executor.as_str(),
        })
    }
}

/// One API call: the endpoint (which decides how it may be retried, see `with_retries`) and
/// the request. Await it, or hand a closure that makes it to `with_retries`.
#[must_use = "a call does nothing until it is awaited"]
pub struct Call<F> {
    pub(super) endpoint: Endpoint,
    pub(super) future: F,
}

impl<F> Call<F> {
    pub fn new(endpoint: Endpoint, future: F) -> Self {
        Call { endpoint, future }
    }
}

impl<F: Future> IntoFuture for Call<F> {
    type Output = F::Output;
    type IntoFuture = F;

    fn into_future(self) -> F {
        self.future
    }
}

impl Client {
    /// `POST /runners/verify`: checks a `glrt-` token and creates (or heartbeats) the runner
    /// manager for `system_id`. The answer is the token's `token_expires_at`.
    pub fn verify<'a>(
        &'a self,
        token: &'a Secret,
        system_id: &'a str,
        info: &'a RunnerInfo,
    ) -> Call<impl Future<Output = Result<Option<String>, ApiError>> + 'a> {
        Call::new(Endpoint::Verify, async move {
            let body =
                json!({"token": token.expose(), "system_id": system_id, "info": info.to_json()});
            let request = self
                .http
                .post(format!("{}/runners/verify", self.api))
                .json(&body);
            let r = Request {
                endpoint: Endpoint::Verify,
                secrets: &[token],
                creates: None,
            };
            let (status, answer) = self.send(&r, request).await?;
            // GitLab answers with the runner: `{"id": ..., "token": ..., ...}`.
            if answer.get("id").and_then(Value::as_u64).is_none() {
                return Err(ApiError::Body {
                    endpoint: Endpoint::Verify,
                    detail: format!("a {status} answer without the runner's id"),
                });
            }
            Ok(token_expires_at(&answer))
        })
    }

    /// `POST /runners` with a legacy registration token.
    pub fn register<'a>(
        &'a self,
        registration_token: &'a Secret,
        info: &'a RunnerInfo,
        settings: &'a RunnerSettings,
    ) -> Call<impl Future<Output = Result<CreatedRunner, ApiError>> + 'a> {
        Call::new(Endpoint::Register, async move {
            let mut body = runner_fields(&info.name, settings);
            body["token"] = json!(registration_token.expose());
            body["info"] = info.to_json();
            let request = self.http.post(format!("{}/runners", self.api)).json(&body);
            let r = Request {
                endpoint: Endpoint::Register,
                secrets: &[registration_token],
                creates: Some(&info.name),
            };
            let (status, answer) = self.send(&r, request).await?;
            created_runner(&r, status, &answer)
        })
    }

    /// `POST /user/runners` with a personal, group or project access token.
    pub fn create_user_runner<'a>(
        &'a self,
        access_token: &'a Secret,
        runner_type: &'a RunnerType,
        info: &'a RunnerInfo,
        settings: &'a RunnerSettings,
    ) -> Call<impl Future<Output = Result<CreatedRunner, ApiError>> + 'a> {
        Call::new(Endpoint::CreateUserRunner, async move {
            let mut body = runner_fields(&info.name, settings);
            body["runner_type"] = json!(runner_type.api_name());
            match runner_type {
                RunnerType::Group(id) => body["group_id"] = json!(id),
                RunnerType::Project(id) => body["project_id"] = json!(id),
                RunnerType::Instance => {}
            }
            let request = self
                .http
                .post(format!("{}/user/runners", self.api))
                .header("PRIVATE-TOKEN", access_token.expose())
                .json(&body);
            let r = Request {
                endpoint: Endpoint::CreateUserRunner,
                secrets: &[access_token],
                creates: Some(&info.name),
            };
            let (status, answer) = self.send(&r, request).await?;
            created_runner(&r, status, &answer)
        })
    }

    /// `DELETE /runners/managers`: removes this VM's manager and leaves the shared runner.
    pub fn delete_manager<'a>(
        &'a self,
        token: &'a Secret,
        system_id: &'a str,
    ) -> Call<impl Future<Output = Result<Deletion, ApiError>> + 'a> {
        Call::new(Endpoint::DeleteManager, async move {
            let request = self
                .http
                .delete(format!("{}/runners/managers", self.api))
                .json(&json!({"token": token.expose(), "system_id": system_id}));
            let r = Request {
                endpoint: Endpoint::DeleteManager,
                secrets: &[token],
                creates: None,
            };
            deletion(self.send(&r, request).await)
        })
    }

    /// `DELETE /runners`: removes the runner this VM created.
    pub fn delete_runner<'a>(
        &'a self,
        token: &'a Secret,
    ) -> Call<impl Future<Output = Result<Deletion, ApiError>> + 'a> {
        Call::new(Endpoint::DeleteRunner, async move {
            let request = self
                .http
                .delete(format!("{}/runners", self.api))
                .json(&json!({"token": token.expose()}));
            let r = Request {
                endpoint: Endpoint::DeleteRunner,
                secrets: &[token],
                creates: None,
            };
            deletion(self.send(&r, request).await)
        })
    }
}

fn runner_fields(name: &str, settings: &RunnerSettings) -> Value {
    let mut body = json!({"description": name});
    if !settings.tags.is_empty() {
        body["tag_list"] = json!(settings.tags);
    }
    if let Some(v) = settings.run_untagged {
        body["run_untagged"] = json!(v);
    }
    if let Some(v) = settings.locked {
        body["locked"] = json!(v);
    }
    if let Some(v) = &settings.access_level {
        body["access_level"] = json!(v.as_str());
    }
    if let Some(v) = settings.maximum_timeout {
        body["maximum_timeout"] = json!(v.as_secs());
    }
    body
}

fn created_runner(r: &Request<'_>, status: u16, body: &Value) -> Result<CreatedRunner, ApiError> {
    #[derive(Deserialize)]
    struct Created {
        id: Option<u64>,
        token: String,
    }
    match serde_json::from_value::<Created>(body.clone()) {
        Ok(created) => Ok(CreatedRunner {
            id: created.id,
            token: Secret::new(created.token),
            token_expires_at: token_expires_at(body),
        }),
        Err(_) if status == 201 => {
            Err(r.maybe_created("a 201 answer without a runner token".into()))
        }
        Err(_) => Err(ApiError::Body {
            endpoint: r.endpoint,
            detail: format!("a {status} answer without a runner token"),
        }),
    }
}

fn deletion(result: Result<(u16, Value), ApiError>) -> Result<Deletion, ApiError> {
    match result {
        Ok(_) => Ok(Deletion::Deleted),
        Err(ApiError::Status {
            status: 403 | 404, ..
        }) => Ok(Deletion::AlreadyGone),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gitlab::error::tests::status;

    #[test]
    fn token_expires_at_as_gitlab_wrote_it() {
        let at = |v: Value| token_expires_at(&json!({"id": 1, "token_expires_at": v}));
        assert_eq!(at(Value::Null), None);
        assert_eq!(token_expires_at(&json!({"id": 1})), None);
        assert_eq!(
            at(json!("2026-12-01T10:00:00.000Z")).as_deref(),
            Some("2026-12-01T10:00:00.000Z")
        );
        assert_eq!(at(json!(1700000000)).as_deref(), Some("1700000000"));
    }

    #[test]
    fn deletion_treats_403_and_404_as_gone() {
        assert_eq!(deletion(Ok((204, Value::Null))).unwrap(), Deletion::Deleted);
        assert_eq!(
            deletion(Err(status(Endpoint::DeleteManager, 404))).unwrap(),
            Deletion::AlreadyGone
        );
        assert_eq!(
            deletion(Err(status(Endpoint::DeleteRunner, 403))).unwrap(),
            Deletion::AlreadyGone
        );
        assert!(deletion(Err(status(Endpoint::DeleteRunner, 500))).is_err());
    }
}
