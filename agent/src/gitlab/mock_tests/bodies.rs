//! What an answer must be: a success is only GitLab's JSON, no answer is read past `MAX_BODY`.

use super::*;

/// Issue item 1: verify took a `200 text/html` login page for "runner token accepted".
#[tokio::test]
async fn a_success_is_only_the_json_gitlab_sends() {
    let gitlab = MockServer::start().await;
    let html =
        ResponseTemplate::new(200).set_body_raw("<html><body>Sign in</body></html>", "text/html");
    Mock::given(method("POST"))
        .and(path("/api/v4/runners/verify"))
        .respond_with(html.clone())
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&gitlab)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/v4/runners/verify"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"token": "x"})))
        .up_to_n_times(1)
        .with_priority(2)
        .mount(&gitlab)
        .await;
    answer(
        &gitlab,
        "POST",
        "/api/v4/runners/verify",
        ResponseTemplate::new(200).set_body_json(json!({"id": 7, "token": TOKEN})),
    )
    .await;
    answer(&gitlab, "DELETE", "/api/v4/runners/managers", html).await;
    answer(
        &gitlab,
        "DELETE",
        "/api/v4/runners",
        ResponseTemplate::new(204),
    )
    .await;
    let c = client(&gitlab);
    let (t, id, i) = (secret(TOKEN), SYSTEM_ID, info());
    let html_err = c.verify(&t, id, &i).await.unwrap_err();
    assert!(
        matches!(&html_err, ApiError::Body { detail, .. } if detail.contains("text/html")),
        "{html_err:?}"
    );
    assert!(!html_err.is_retryable());
    let no_id = c.verify(&t, id, &i).await.unwrap_err();
    assert!(matches!(no_id, ApiError::Body { .. }), "{no_id:?}");
    c.verify(&t, id, &i).await.unwrap();
    let err = c.delete_manager(&t, id).await.unwrap_err();
    assert!(matches!(err, ApiError::Body { .. }), "{err:?}");
    assert_eq!(c.delete_runner(&t).await.unwrap(), Deletion::Deleted);
}

/// Issue item 14: bodies had no size cap.
#[tokio::test]
async fn answers_past_max_body_are_a_body_error() {
    let gitlab = MockServer::start().await;
    let pad = "x".repeat(MAX_BODY);
    answer(
        &gitlab,
        "POST",
        "/api/v4/runners/verify",
        ResponseTemplate::new(200).set_body_json(json!({"id": 7, "pad": pad})),
    )
    .await;
    answer(
        &gitlab,
        "DELETE",
        "/api/v4/runners/managers",
        ResponseTemplate::new(503).set_body_raw("y".repeat(1 << 20), "text/plain"),
    )
    .await;
    let c = client(&gitlab);
    let t = secret(TOKEN);
    let err = c.verify(&t, SYSTEM_ID, &info()).await.unwrap_err();
    assert!(
        matches!(&err, ApiError::Body { detail, .. } if detail.contains("larger than 64 KiB")),
        "{err:?}"
    );
    // Of an error status only the beginning is read; the status still decides.
    let err = c.delete_manager(&t, SYSTEM_ID).await.unwrap_err();
    let ApiError::Status {
        status, message, ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(*status, 503);
    assert!(err.is_retryable());
    assert!(message.chars().count() <= MAX_MESSAGE_CHARS + 1);
}

/// `MAX_BODY` itself is read, one byte more is not: with a length announced, and without.
#[tokio::test]
async fn max_body_is_the_limit_with_or_without_a_length() {
    let (t, i) = (secret(TOKEN), info());
    for (len, fits) in [(MAX_BODY, true), (MAX_BODY + 1, false)] {
        let body = json_of_len(len);
        assert_eq!(body.len(), len);
        let gitlab = MockServer::start().await;
        answer(
            &gitlab,
            "POST",
            "/api/v4/runners/verify",
            ResponseTemplate::new(200).set_body_raw(body.clone(), "application/json"),
        )
        .await;
        let with_length = client(&gitlab).verify(&t, SYSTEM_ID, &i).await;
        let (url, server) = raw_server(chunked("200 OK", body.as_bytes())).await;
        let c = Client::new(&url, None).unwrap();
        let without_length = c.verify(&t, SYSTEM_ID, &i).await;
        server.abort();
        for result in [with_length, without_length] {
            match result {
                Ok(_) => assert!(fits, "{len} bytes were read"),
                Err(ApiError::Body { detail, .. }) => {
                    assert!(!fits, "{len}: {detail}");
                    assert_eq!(detail, "a 200 answer larger than 64 KiB");
                }
                Err(e) => panic!("{len}: {e:?}"),
            }
        }
    }
}

/// An empty success is no runner: verify needs the id.
#[tokio::test]
async fn an_empty_success_to_verify_is_a_body_error() {
    for body in ["", "  \r\n", "null", "[]", "{\"id\": \"7\"}"] {
        let gitlab = MockServer::start().await;
        answer(
            &gitlab,
            "POST",
            "/api/v4/runners/verify",
            ResponseTemplate::new(200).set_body_raw(body, "application/json"),
        )
        .await;
        let err = client(&gitlab)
            .verify(&secret(TOKEN), SYSTEM_ID, &info())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ApiError::Body { detail, .. } if detail == "a 200 answer without the runner's id"),
            "{body:?}: {err:?}"
        );
        assert!(!err.is_retryable());
        assert!(
            err.fix().contains("not at a proxy or login page"),
            "{}",
            err.fix()
        );
    }
}
