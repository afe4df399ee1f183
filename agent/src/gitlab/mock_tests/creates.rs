//! The calls that create a runner: retried only when the request surely created nothing,
//! `MaybeCreated` otherwise.

use std::time::Duration;

use super::*;

/// Issue item 8: a create was retried after answers that may come from a created runner.
#[tokio::test]
async fn a_create_is_not_retried_after_an_answer_that_may_come_from_a_created_runner() {
    for code in [500, 502, 504] {
        let gitlab = MockServer::start().await;
        answer(
            &gitlab,
            "POST",
            "/api/v4/user/runners",
            ResponseTemplate::new(code).set_body_raw("Bad Gateway", "text/plain"),
        )
        .await;
        answer(
            &gitlab,
            "POST",
            "/api/v4/runners",
            ResponseTemplate::new(201).set_body_raw("<html/>", "text/html"),
        )
        .await;
        let c = client(&gitlab);
        let (i, settings) = (info(), RunnerSettings::default());
        let (access, kind) = (secret(ACCESS), RunnerType::Instance);
        let deadline = Instant::now() + Duration::from_secs(60);
        let err = with_retries("create runner", deadline, || {
            c.create_user_runner(&access, &kind, &i, &settings)
        })
        .await
        .unwrap_err();
        let RetryError::Permanent(err @ ApiError::MaybeCreated { .. }) = err else {
            panic!("{code}: {err:?}")
        };
        assert!(err.to_string().contains(&code.to_string()), "{err}");
        assert!(err.fix().contains("\"vm-test\""), "{}", err.fix());
        // A 201 whose token cannot be read created a runner all the same.
        let reg = secret("GR1348941fake.registration.xxxx");
        let err = with_retries("register", deadline, || c.register(&reg, &i, &settings))
            .await
            .unwrap_err();
        assert!(
            matches!(err, RetryError::Permanent(ApiError::MaybeCreated { .. })),
            "{err:?}"
        );
        assert_eq!(gitlab.received_requests().await.unwrap().len(), 2);
    }
}

#[tokio::test]
async fn a_create_is_retried_when_it_surely_created_nothing_and_verify_after_a_502() {
    let gitlab = MockServer::start().await;
    for (url_path, first) in [
        ("/api/v4/user/runners", 503),
        ("/api/v4/runners/verify", 502),
    ] {
        Mock::given(method("POST"))
            .and(path(url_path))
            .respond_with(ResponseTemplate::new(first))
            .up_to_n_times(1)
            .with_priority(1)
            .mount(&gitlab)
            .await;
    }
    answer(
        &gitlab,
        "POST",
        "/api/v4/user/runners",
        ResponseTemplate::new(201).set_body_json(json!({"id": 9, "token": "glrt-t3_fake.xxxx"})),
    )
    .await;
    answer(
        &gitlab,
        "POST",
        "/api/v4/runners/verify",
        ResponseTemplate::new(200).set_body_json(json!({"id": 9})),
    )
    .await;
    let c = client(&gitlab);
    let (i, settings) = (info(), RunnerSettings::default());
    let (access, kind, t) = (secret(ACCESS), RunnerType::Group(3), secret(TOKEN));
    let deadline = Instant::now() + Duration::from_secs(60);
    let created = with_retries("create runner", deadline, || {
        c.create_user_runner(&access, &kind, &i, &settings)
    })
    .await
    .unwrap();
    assert_eq!(created.id, Some(9));
    with_retries("verify", deadline, || c.verify(&t, SYSTEM_ID, &i))
        .await
        .unwrap();
    assert_eq!(gitlab.received_requests().await.unwrap().len(), 4);
}

#[tokio::test]
async fn a_create_without_an_answer_may_have_created_a_runner_unless_never_sent() {
    let (i, settings) = (info(), RunnerSettings::default());
    let (access, kind) = (secret(ACCESS), RunnerType::Instance);
    // A server that reads the request and hangs up without an answer.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut buf = vec![0; 16 * 1024];
            let _ = conn.read(&mut buf).await;
        }
    });
    let c = Client::new(&format!("http://{addr}"), None).unwrap();
    let err = c
        .create_user_runner(&access, &kind, &i, &settings)
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::MaybeCreated { .. }), "{err:?}");
    // Verify is idempotent: the same failure is a network error, retried.
    let err = c.verify(&secret(TOKEN), SYSTEM_ID, &i).await.unwrap_err();
    assert!(
        matches!(err, ApiError::Transport { .. }) && err.is_retryable(),
        "{err:?}"
    );
    server.abort();
    // Refused: nothing was sent, so even a create is retried.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let c = Client::new(&format!("http://{addr}"), None).unwrap();
    let err = c
        .create_user_runner(&access, &kind, &i, &settings)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ApiError::Transport { .. }) && err.is_retryable(),
        "{err:?}"
    );
}

/// A 201 is a created runner whatever its body says; a 200 or an error status is not.
#[tokio::test]
async fn only_a_201_without_a_token_may_have_created_a_runner() {
    let (access, i, s) = (secret(ACCESS), info(), RunnerSettings::default());
    for (code, body, maybe_created) in [
        (201, json!({"id": 9}), true),
        (201, json!({"id": 9, "token": 12}), true),
        (200, json!({"id": 9}), false),
        (200, json!("ok"), false),
    ] {
        let gitlab = MockServer::start().await;
        answer(
            &gitlab,
            "POST",
            "/api/v4/user/runners",
            ResponseTemplate::new(code).set_body_json(body.clone()),
        )
        .await;
        let err = client(&gitlab)
            .create_user_runner(&access, &RunnerType::Instance, &i, &s)
            .await
            .unwrap_err();
        let detail = format!("a {code} answer without a runner token");
        if maybe_created {
            assert!(
                matches!(&err, ApiError::MaybeCreated { detail: d, description, .. } if *d == detail && description == "vm-test"),
                "{body}: {err:?}"
            );
        } else {
            assert!(
                matches!(&err, ApiError::Body { detail: d, .. } if *d == detail),
                "{code} {body}: {err:?}"
            );
        }
        assert!(!err.is_retryable());
    }
    // Not JSON: the same, by status.
    for (code, maybe_created) in [(201, true), (200, false)] {
        let gitlab = MockServer::start().await;
        let html = ResponseTemplate::new(code).set_body_raw("<html/>", "text/html");
        answer(&gitlab, "POST", "/api/v4/user/runners", html).await;
        let err = client(&gitlab)
            .create_user_runner(&access, &RunnerType::Instance, &i, &s)
            .await
            .unwrap_err();
        assert_eq!(
            matches!(err, ApiError::MaybeCreated { .. }),
            maybe_created,
            "{err:?}"
        );
    }
    // A client error is GitLab refusing: nothing was created.
    let gitlab = MockServer::start().await;
    let refused = ResponseTemplate::new(400).set_body_json(json!({"message": "bad tags"}));
    answer(&gitlab, "POST", "/api/v4/user/runners", refused).await;
    let err = client(&gitlab)
        .create_user_runner(&access, &RunnerType::Instance, &i, &s)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ApiError::Status { status: 400, .. }),
        "{err:?}"
    );
}

/// A success cut short, after a create, may be the created runner's token lost on the way.
#[tokio::test]
async fn a_success_cut_short_may_have_created_a_runner() {
    let (access, i, s) = (secret(ACCESS), info(), RunnerSettings::default());
    let cut = b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"id\": 9, \"tok".to_vec();
    let (url, server) = raw_server(cut).await;
    let c = Client::new(&url, None).unwrap();
    let err = c
        .create_user_runner(&access, &RunnerType::Instance, &i, &s)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ApiError::MaybeCreated { detail, .. } if detail.starts_with("no answer: ")),
        "{err:?}"
    );
    // Verify creates nothing: the same is a network error, retried.
    let err = c.verify(&secret(TOKEN), SYSTEM_ID, &i).await.unwrap_err();
    assert!(
        matches!(err, ApiError::Transport { .. }) && err.is_retryable(),
        "{err:?}"
    );
    server.abort();
}
