//! What each status means, per endpoint, as GitLab sends it: successes, permanent errors with
//! their fix, retryable errors, and deletions that find nothing to delete.

use super::*;

/// Each call once, against `gitlab`: the verdict, or the error.
async fn call(c: &Client, endpoint: Endpoint) -> Result<(), ApiError> {
    let (t, i, s) = (secret(TOKEN), info(), RunnerSettings::default());
    match endpoint {
        Endpoint::Verify => c.verify(&t, SYSTEM_ID, &i).await.map(drop),
        Endpoint::Register => c.register(&t, &i, &s).await.map(drop),
        Endpoint::CreateUserRunner => {
            let access = secret(ACCESS);
            c.create_user_runner(&access, &RunnerType::Group(3), &i, &s)
                .await
                .map(drop)
        }
        Endpoint::DeleteManager => c.delete_manager(&t, SYSTEM_ID).await.map(drop),
        Endpoint::DeleteRunner => c.delete_runner(&t).await.map(drop),
    }
}

fn url_path(endpoint: Endpoint) -> (&'static str, &'static str) {
    match endpoint {
        Endpoint::Verify => ("POST", "/api/v4/runners/verify"),
        Endpoint::Register => ("POST", "/api/v4/runners"),
        Endpoint::CreateUserRunner => ("POST", "/api/v4/user/runners"),
        Endpoint::DeleteManager => ("DELETE", "/api/v4/runners/managers"),
        Endpoint::DeleteRunner => ("DELETE", "/api/v4/runners"),
    }
}

/// A fresh server whose `endpoint` answers `r`.
async fn gitlab_answering(endpoint: Endpoint, r: ResponseTemplate) -> MockServer {
    let gitlab = MockServer::start().await;
    let (m, p) = url_path(endpoint);
    answer(&gitlab, m, p, r).await;
    gitlab
}

#[tokio::test]
async fn permanent_statuses_name_the_fix_for_their_endpoint() {
    use Endpoint::*;
    for (endpoint, code, fix) in [
        (Verify, 400, "rejected the request's parameters"),
        (Verify, 401, "not accepted"),
        (Verify, 403, "Settings > CI/CD > Runners > New runner"),
        (Verify, 404, "no GitLab runner API at this url"),
        (Verify, 410, "GitLab's logs"),
        (Verify, 422, "orphaned"),
        (Register, 403, "registration token is wrong"),
        (Register, 410, "registration tokens disabled"),
        (CreateUserRunner, 400, "rejected the request's parameters"),
        (CreateUserRunner, 401, "expired or revoked"),
        (CreateUserRunner, 403, "create_runner"),
        (CreateUserRunner, 404, "group_id or project_id"),
        (CreateUserRunner, 422, "GitLab's logs"),
        (DeleteManager, 401, "not accepted"),
        (DeleteRunner, 400, "rejected the request's parameters"),
    ] {
        let body = json!({"message": format!("{code} says no")});
        let gitlab =
            gitlab_answering(endpoint, ResponseTemplate::new(code).set_body_json(body)).await;
        let err = call(&client(&gitlab), endpoint).await.unwrap_err();
        let ApiError::Status {
            endpoint: e,
            status,
            message,
            retry_hint,
        } = &err
        else {
            panic!("{endpoint:?} {code}: {err:?}")
        };
        assert_eq!((*e, *status), (endpoint, code));
        assert_eq!(message, &format!("{code} says no"));
        assert_eq!(*retry_hint, None);
        assert!(!err.is_retryable(), "{endpoint:?} {code}");
        assert!(
            err.fix().contains(fix),
            "{endpoint:?} {code}: {}",
            err.fix()
        );
        let (m, p) = url_path(endpoint);
        assert!(
            err.to_string()
                .starts_with(&format!("GitLab answered {code} to {m} {p}: ")),
            "{err}"
        );
        assert_eq!(gitlab.received_requests().await.unwrap().len(), 1);
    }
}

#[tokio::test]
async fn throttling_and_server_errors_are_retryable_for_idempotent_calls() {
    use Endpoint::*;
    for endpoint in [Verify, DeleteManager, DeleteRunner] {
        for code in [408, 429, 500, 502, 503, 504] {
            let gitlab = gitlab_answering(endpoint, ResponseTemplate::new(code)).await;
            let err = call(&client(&gitlab), endpoint).await.unwrap_err();
            assert!(
                matches!(err, ApiError::Status { status, .. } if status == code),
                "{endpoint:?} {code}: {err:?}"
            );
            assert!(err.is_retryable(), "{endpoint:?} {code}");
        }
    }
    // For the calls that create a runner, only what surely created nothing.
    for endpoint in [Register, CreateUserRunner] {
        for code in [408, 429, 503] {
            let gitlab = gitlab_answering(endpoint, ResponseTemplate::new(code)).await;
            let err = call(&client(&gitlab), endpoint).await.unwrap_err();
            assert!(
                matches!(err, ApiError::Status { .. }) && err.is_retryable(),
                "{endpoint:?} {code}: {err:?}"
            );
        }
    }
}

#[tokio::test]
async fn a_deletion_that_finds_nothing_to_delete_is_already_gone() {
    let t = secret(TOKEN);
    for (code, body, expected) in [
        (204, "", Some(Deletion::Deleted)),
        (200, "", Some(Deletion::Deleted)),
        (200, " \n", Some(Deletion::Deleted)),
        (200, "{}", Some(Deletion::Deleted)),
        (
            403,
            "{\"message\": \"403 Forbidden\"}",
            Some(Deletion::AlreadyGone),
        ),
        (
            404,
            "{\"message\": \"404 Not found\"}",
            Some(Deletion::AlreadyGone),
        ),
        (401, "", None),
        (410, "", None),
        (500, "", None),
    ] {
        let r = || ResponseTemplate::new(code).set_body_raw(body, "application/json");
        let gitlab = MockServer::start().await;
        answer(&gitlab, "DELETE", "/api/v4/runners/managers", r()).await;
        answer(&gitlab, "DELETE", "/api/v4/runners", r()).await;
        let c = client(&gitlab);
        let manager = c.delete_manager(&t, SYSTEM_ID).await;
        let runner = c.delete_runner(&t).await;
        for got in [manager, runner] {
            match expected {
                Some(deletion) => assert_eq!(got.unwrap(), deletion, "{code} {body:?}"),
                None => assert!(
                    matches!(got, Err(ApiError::Status { status, .. }) if status == code),
                    "{code}: {got:?}"
                ),
            }
        }
    }
}

#[tokio::test]
async fn successes_carry_what_the_agent_needs() {
    let gitlab = MockServer::start().await;
    answer(
        &gitlab,
        "POST",
        "/api/v4/runners/verify",
        ResponseTemplate::new(200).set_body_json(json!({"id": 7, "token": TOKEN})),
    )
    .await;
    answer(
        &gitlab,
        "POST",
        "/api/v4/user/runners",
        ResponseTemplate::new(201).set_body_json(
            json!({"id": 9, "token": "glrt-created.xxxx.xxxx", "token_expires_at": null}),
        ),
    )
    .await;
    // A legacy registration answers without an id on some versions; the token is what counts.
    answer(
        &gitlab,
        "POST",
        "/api/v4/runners",
        ResponseTemplate::new(201).set_body_json(json!({"token": "glrt-registered.xxxx"})),
    )
    .await;
    let c = client(&gitlab);
    let (i, s) = (info(), RunnerSettings::default());
    c.verify(&secret(TOKEN), SYSTEM_ID, &i).await.unwrap();
    let created = c
        .create_user_runner(&secret(ACCESS), &RunnerType::Instance, &i, &s)
        .await
        .unwrap();
    assert_eq!(created.id, Some(9));
    assert_eq!(created.token.expose(), "glrt-created.xxxx.xxxx");
    let registered = c
        .register(&secret("GR1348941fake.xxxx"), &i, &s)
        .await
        .unwrap();
    assert_eq!(registered.id, None);
    assert_eq!(registered.token.expose(), "glrt-registered.xxxx");
}

#[tokio::test]
async fn the_message_is_gitlabs_message_or_error_field_or_the_text() {
    for (body, content_type, message) in [
        (
            r#"{"message": "  403 Forbidden  "}"#,
            "application/json",
            "403 Forbidden",
        ),
        (
            r#"{"error": "invalid_token"}"#,
            "application/json",
            "invalid_token",
        ),
        (
            r#"{"message": {"tags": ["is invalid"]}}"#,
            "application/json",
            r#"{"tags":["is invalid"]}"#,
        ),
        (r#"{"other": 1}"#, "application/json", r#"{"other": 1}"#),
        ("Forbidden\n", "text/plain", "Forbidden"),
        ("", "text/plain", ""),
        ("\u{fffd}ok", "text/plain", "\u{fffd}ok"),
    ] {
        let gitlab = gitlab_answering(
            Endpoint::Verify,
            ResponseTemplate::new(400).set_body_raw(body, content_type),
        )
        .await;
        let err = call(&client(&gitlab), Endpoint::Verify).await.unwrap_err();
        assert!(
            matches!(&err, ApiError::Status { message: m, .. } if m == message),
            "{body:?}: {err:?}"
        );
    }
    // Bytes that are not UTF-8 still make a message.
    let gitlab = gitlab_answering(
        Endpoint::Verify,
        ResponseTemplate::new(400).set_body_raw(&b"bad \xff byte"[..], "text/plain"),
    )
    .await;
    let err = call(&client(&gitlab), Endpoint::Verify).await.unwrap_err();
    assert!(
        matches!(&err, ApiError::Status { message, .. } if message == "bad \u{fffd} byte"),
        "{err:?}"
    );
}
