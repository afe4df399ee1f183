//! runner.json's `cache` through the real binary: the `[runners.cache]` that gitlab-runner
//! reads from config.toml, key for key and type for type as gitlab-runner's
//! `cache/cacheconfig/cacheconfig.go` declares them; hostile values refused before any GitLab
//! call; the cache's secrets masked in everything the agent writes, gitlab-runner's output
//! included.

mod common;

use common::*;
use serde_json::{Value, json};

const SECRET_KEY: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
const ACCOUNT_KEY: &str = "YXp1cmVhY2NvdW50a2V5YXp1cmVhY2NvdW50a2V5";
const PRIVATE_KEY: &str =
    "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----\n";

/// A fake gitlab-runner that prints all of config.toml, as a careless one might: the agent
/// must mask the cache's secrets in what it logs.
fn write_printing_runner(h: &Harness) -> std::path::PathBuf {
    let script = format!(
        "#!/bin/sh\necho \"$*\" >> {dir}/runner-invocations\ncat \"$3\"\nexit 0\n",
        dir = h.dir.path().display()
    );
    h.write_script("gitlab-runner", &script)
}

/// Runs the agent once with `cache` and returns config.toml's `[runners.cache]`.
async fn rendered(cache: Value) -> (Harness, toml::Table) {
    let mut h = Harness::new().await;
    h.prepare_glrt(json!({"cache": cache})).await;
    let runner = write_printing_runner(&h);
    h.start(&runner, &[]);
    let status = h.wait_exit().await;
    assert!(status.success(), "{status:?}\n{}", h.log());
    let text = std::fs::read_to_string(h.state_dir().join("config.toml")).unwrap();
    let table: toml::Table = text.parse().expect("config.toml is TOML");
    let runner = &table["runners"].as_array().unwrap()[0];
    let cache = runner["cache"].as_table().expect("[runners.cache]").clone();
    (h, cache)
}

fn toml(text: &str) -> toml::Table {
    text.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_with_the_instance_role_says_iam_explicitly() {
    let (_h, cache) = rendered(json!({"Type": "s3", "Path": "fleet-a",
        "s3": {"BucketName": "runners-cache", "BucketLocation": "eu-west-1",
               "ServerSideEncryption": "KMS", "ServerSideEncryptionKeyID": "alias/cache",
               "DualStack": false, "AssumeRoleMaxConcurrency": -1}}))
    .await;
    assert_eq!(
        cache,
        toml(
            r#"
            Type = "s3"
            Path = "fleet-a"
            Shared = false
            [s3]
            BucketName = "runners-cache"
            BucketLocation = "eu-west-1"
            ServerSideEncryption = "KMS"
            ServerSideEncryptionKeyID = "alias/cache"
            DualStack = false
            AssumeRoleMaxConcurrency = -1
            AuthenticationType = "iam"
            "#
        )
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_keys_from_files_reach_config_toml_and_nothing_else() {
    let mut h = Harness::new().await;
    let secret_file = h.path("s3-secret");
    std::fs::write(&secret_file, format!("{SECRET_KEY}\n")).unwrap();
    h.mount_glrt_happy_path().await;
    h.write_config(json!({"token": TOKEN, "cache": {"Type": "s3",
        "s3": {"ServerAddress": "minio.example.com:9000", "AccessKey": "AKIAIOSFODNN7EXAMPLE",
               "SecretKey_file": secret_file, "BucketName": "runners-cache",
               "Insecure": true, "PathStyle": true}}}));
    let runner = write_printing_runner(&h);
    h.start(&runner, &[]);
    assert!(h.wait_exit().await.success(), "{}", h.log());
    let text = std::fs::read_to_string(h.state_dir().join("config.toml")).unwrap();
    let cache = toml(&text)["runners"][0]["cache"]
        .as_table()
        .unwrap()
        .clone();
    assert_eq!(
        cache,
        toml(&format!(
            r#"
            Type = "s3"
            Shared = false
            [s3]
            ServerAddress = "minio.example.com:9000"
            AccessKey = "AKIAIOSFODNN7EXAMPLE"
            SecretKey = "{SECRET_KEY}"
            BucketName = "runners-cache"
            Insecure = true
            PathStyle = true
            AuthenticationType = "access-key"
            "#
        ))
    );
    // gitlab-runner printed config.toml: the agent's log has the line, masked.
    let all = h.all_output();
    assert!(all.contains("SecretKey = "), "{all}");
    assert!(!all.contains(SECRET_KEY), "{all}");
    assert!(!all.contains("AKIAIOSFODNN7EXAMPLE"), "{all}");
}

#[tokio::test(flavor = "multi_thread")]
async fn gcs_with_the_service_account_or_a_key_file() {
    let (_h, cache) = rendered(json!({"Type": "gcs", "Shared": true,
        "MaxUploadedArchiveSize": 1073741824_u64,
        "gcs": {"BucketName": "runners-cache"}}))
    .await;
    assert_eq!(
        cache,
        toml(
            r#"
            Type = "gcs"
            Shared = true
            MaxUploadedArchiveSize = 1073741824
            [gcs]
            BucketName = "runners-cache"
            "#
        )
    );
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("gcs-key.json");
    std::fs::write(
        &key,
        json!({"type": "service_account", "private_key": PRIVATE_KEY}).to_string(),
    )
    .unwrap();
    let (h, cache) = rendered(json!({"Type": "gcs",
        "gcs": {"BucketName": "runners-cache", "CredentialsFile": key}}))
    .await;
    assert_eq!(cache["gcs"]["CredentialsFile"].as_str(), key.to_str());
    // gitlab-runner reads the key file itself: its content is nowhere else.
    assert!(!h.all_output().contains("MIIEvQ"), "{}", h.all_output());
}

#[tokio::test(flavor = "multi_thread")]
async fn gcs_private_key_keeps_its_line_breaks() {
    let (h, cache) = rendered(json!({"Type": "gcs", "gcs": {"BucketName": "c",
        "AccessID": "cache@p.iam.gserviceaccount.com", "PrivateKey": PRIVATE_KEY}}))
    .await;
    assert_eq!(
        cache["gcs"]["PrivateKey"].as_str(),
        Some(PRIVATE_KEY.trim_end())
    );
    assert!(!h.all_output().contains("MIIEvQ"), "{}", h.all_output());
}

#[tokio::test(flavor = "multi_thread")]
async fn azure_with_a_managed_identity_or_a_key_file() {
    let (_h, cache) = rendered(json!({"Type": "azure",
        "azure": {"AccountName": "runnerscache", "ContainerName": "runners-cache"}}))
    .await;
    assert_eq!(
        cache,
        toml(
            r#"
            Type = "azure"
            Shared = false
            [azure]
            AccountName = "runnerscache"
            ContainerName = "runners-cache"
            "#
        )
    );
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("azure-key");
    std::fs::write(&key, ACCOUNT_KEY).unwrap();
    let (h, cache) = rendered(json!({"Type": "azure", "azure": {"AccountName": "a",
        "AccountKey_file": key, "ContainerName": "c",
        "StorageDomain": "blob.core.chinacloudapi.cn"}}))
    .await;
    assert_eq!(cache["azure"]["AccountKey"].as_str(), Some(ACCOUNT_KEY));
    assert_eq!(
        cache["azure"]["StorageDomain"].as_str(),
        Some("blob.core.chinacloudapi.cn")
    );
    assert!(!h.all_output().contains(ACCOUNT_KEY), "{}", h.all_output());
}

#[tokio::test(flavor = "multi_thread")]
async fn toml_syntax_in_a_value_stays_inside_its_string() {
    let path = "a\" ]\n[runners.docker]\nprivileged = true\n#";
    let one_line = "a\" Shared = true [runners.docker] privileged = true # '''";
    let (_h, cache) = rendered(json!({"Type": "s3", "Path": one_line,
        "s3": {"BucketName": "b'\"\\u0000"}}))
    .await;
    assert_eq!(cache["Path"].as_str(), Some(one_line));
    assert_eq!(cache["Shared"].as_bool(), Some(false));
    assert_eq!(cache["s3"]["BucketName"].as_str(), Some("b'\"\\u0000"));
    assert_eq!(cache.len(), 4, "{cache:?}");

    // A line break, a control or invisible character, or a value too long: refused before
    // any request to GitLab, with the path and the fix.
    for (cache, at) in [
        (
            json!({"Type": "s3", "Path": path, "s3": {"BucketName": "b"}}),
            "$.cache.Path",
        ),
        (
            json!({"Type": "s3", "s3": {"BucketName": "b\u{1b}]0;x\u{7}"}}),
            "$.cache.s3.BucketName",
        ),
        (
            json!({"Type": "s3", "s3": {"BucketName": "b", "RoleARN": "arn\u{202e}x"}}),
            "$.cache.s3.RoleARN",
        ),
        (
            json!({"Type": "s3", "s3": {"BucketName": "b".repeat(100_000)}}),
            "$.cache.s3.BucketName",
        ),
    ] {
        let mut h = Harness::new().await;
        h.prepare_glrt(json!({"cache": cache})).await;
        let runner = write_printing_runner(&h);
        h.start(&runner, &[]);
        let _ = h.wait_exit().await;
        assert!(h.requests("POST", VERIFY).await.is_empty());
        assert!(h.runner_invocations().is_empty());
        assert!(h.log().contains(at), "{at}: {}", h.log());
        assert!(!h.state_dir().join("config.toml").exists());
    }
}

// ---- the instance's identity and the metadata firewall ----

/// A stand-in for the firewall's script that records how it was called.
fn write_firewall(h: &Harness) -> std::path::PathBuf {
    let script = format!(
        "#!/bin/sh\necho \"$*\" >> {dir}/firewall-calls\nexit 0\n",
        dir = h.dir.path().display()
    );
    h.write_script("metadata-firewall", &script)
}

/// Runs the agent with `cache` and `args`; whether it exited 0.
async fn run_with(h: &mut Harness, cache: Value, args: &[&str]) {
    h.prepare_glrt(json!({"cache": cache})).await;
    let runner = write_printing_runner(h);
    h.start(&runner, args);
    let status = h.wait_exit().await;
    assert!(status.success(), "{status:?}\n{}", h.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_identity_cache_without_a_cgroup_for_gitlab_runner_admits_nothing_and_takes_no_job() {
    // Without --separate-cgroups gitlab-runner shares the agent's unit cgroup with the jobs:
    // admitting it would admit them. Each kind of instance identity.
    for cache in [
        json!({"Type": "s3", "s3": {"BucketName": "b"}}),
        json!({"Type": "gcs", "gcs": {"BucketName": "b"}}),
        json!({"Type": "azure", "azure": {"AccountName": "a", "ContainerName": "c"}}),
    ] {
        let mut h = Harness::new().await;
        let firewall = write_firewall(&h);
        let fw = firewall.display().to_string();
        run_with(&mut h, cache.clone(), &["--metadata-firewall", &fw]).await;
        assert_eq!(h.read("firewall-calls"), None, "{cache}");
        assert!(h.runner_invocations().is_empty(), "{cache}");
        assert!(h.requests("POST", VERIFY).await.is_empty());
        let last_error = h.status()["last_error"].as_str().unwrap_or("").to_string();
        assert!(
            last_error.contains("cannot admit gitlab-runner to the metadata service")
                && last_error.contains("no cgroup of its own"),
            "{cache}: {last_error}"
        );
        assert!(last_error.contains("--separate-cgroups"), "{last_error}");
        assert!(h.powered_off());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cache_with_keys_of_its_own_admits_nothing() {
    let mut h = Harness::new().await;
    let firewall = write_firewall(&h);
    let key_file = h.path("secret-key");
    std::fs::write(&key_file, SECRET_KEY).unwrap();
    let fw = firewall.display().to_string();
    run_with(
        &mut h,
        json!({"Type": "s3", "s3": {"BucketName": "b", "AccessKey": "AKIAEXAMPLE",
            "SecretKey_file": key_file.display().to_string()}}),
        &["--metadata-firewall", &fw],
    )
    .await;
    assert_eq!(h.read("firewall-calls"), None);
    assert_eq!(h.runner_invocations().len(), 1, "{}", h.log());
    assert!(h.status()["last_error"].is_null());
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_firewall_script_an_identity_cache_runs_and_says_so() {
    let mut h = Harness::new().await;
    run_with(
        &mut h,
        json!({"Type": "s3", "s3": {"BucketName": "b"}}),
        &[],
    )
    .await;
    assert_eq!(h.runner_invocations().len(), 1, "{}", h.log());
    assert!(
        h.log()
            .contains("no --metadata-firewall, so nothing is admitted"),
        "{}",
        h.log()
    );
}
