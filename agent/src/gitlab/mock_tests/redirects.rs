//! No redirect is followed: a token never travels to an address runner.json does not name.

use super::*;

/// Issue item 1: a 308 on verify resent the body, token included, to the other host.
#[tokio::test]
async fn redirects_are_not_followed_and_name_their_location() {
    let gitlab = MockServer::start().await;
    let elsewhere = MockServer::start().await;
    let target = format!("{}/x", elsewhere.uri());
    answer(
        &gitlab,
        "POST",
        "/api/v4/runners/verify",
        ResponseTemplate::new(308).insert_header("Location", target.as_str()),
    )
    .await;
    answer(
        &gitlab,
        "POST",
        "/api/v4/user/runners",
        ResponseTemplate::new(302).insert_header("Location", target.as_str()),
    )
    .await;
    let c = client(&gitlab);
    let err = c
        .verify(&secret(TOKEN), SYSTEM_ID, &info())
        .await
        .unwrap_err();
    let ApiError::Redirect {
        status, location, ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!((*status, location.as_str()), (308, target.as_str()));
    assert!(!err.is_retryable());
    let host = elsewhere.address().to_string();
    assert!(
        err.fix().contains(&format!("https://{host}")),
        "{}",
        err.fix()
    );
    // PRIVATE-TOKEN stays home too, and a redirect is not a runner that may exist.
    let err = c
        .create_user_runner(
            &secret(ACCESS),
            &RunnerType::Project(42),
            &info(),
            &RunnerSettings::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, ApiError::Redirect { status: 302, .. }),
        "{err:?}"
    );
    assert!(elsewhere.received_requests().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_redirect_shows_no_user_info_query_or_token_and_suggests_the_base_url() {
    let gitlab = MockServer::start().await;
    answer(
        &gitlab,
        "POST",
        "/api/v4/runners/verify",
        ResponseTemplate::new(301).insert_header(
            "Location",
            "http://user:pw@gitlab.example.com:8443/gl/api/v4/runners/verify?s=glpat-fake.xxxxxxxxxxxxxxxx#f",
        ),
    )
    .await;
    let err = client(&gitlab)
        .verify(&secret(TOKEN), SYSTEM_ID, &info())
        .await
        .unwrap_err();
    let text = format!("{err} {}", err.fix());
    assert!(
        text.contains("a redirect to http://gitlab.example.com:8443/gl/api/v4/runners/verify;"),
        "{text}"
    );
    assert!(
        text.contains("probably https://gitlab.example.com:8443/gl)"),
        "{text}"
    );
    for hidden in ["user", "pw@", "glpat", "#f"] {
        assert!(!text.contains(hidden), "{hidden}: {text}");
    }
}
