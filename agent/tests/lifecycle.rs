//! The whole lifecycle through the real binary: fake GitLab, fake gitlab-runner, recorded
//! power-off.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use wiremock::ResponseTemplate;
use wiremock::matchers::{header, method, path};

fn system_id_is_valid(id: &str) -> bool {
    id.len() == 14 && id.starts_with("r_") && id[2..].chars().all(|c| c.is_ascii_alphanumeric())
}

#[tokio::test(flavor = "multi_thread")]
async fn glrt_token_verify_run_single_deregister_power_off() {
    let mut h = Harness::new().await;
    h.start_glrt(
        json!({"max_jobs": 3, "idle_timeout": 120}),
        FakeRunner::default(),
        &[],
    )
    .await;
    let status = h.wait_exit().await;
    assert!(status.success(), "exit {status:?}\n{}", h.log());

    // One system id everywhere: the file gitlab-runner reads, verify, and the deletion.
    let system_id = h.system_id_file();
    assert!(system_id_is_valid(&system_id), "{system_id:?}");
    assert_eq!(h.read("runner-system-id").unwrap(), system_id);
    let verify = h.requests("POST", VERIFY).await;
    assert_eq!(verify.len(), 1);
    assert_eq!(body(&verify[0])["token"], TOKEN);
    assert_eq!(body(&verify[0])["system_id"], system_id.as_str());
    assert_eq!(body(&verify[0])["info"]["executor"], "shell");
    let deleted = h.requests("DELETE", MANAGERS).await;
    assert_eq!(deleted.len(), 1);
    assert_eq!(
        body(&deleted[0]),
        json!({"token": TOKEN, "system_id": system_id})
    );
    // A shared glrt- token must never be deleted as a whole.
    assert!(h.requests("DELETE", "/api/v4/runners").await.is_empty());

    let config_toml = h.state_dir().join("config.toml");
    assert_eq!(
        h.runner_invocations(),
        vec![format!(
            "run-single -c {} -r vm-test --max-builds 3 --wait-timeout 120",
            config_toml.display()
        )]
    );
    for f in ["config.toml", ".runner_system_id"] {
        let mode = std::fs::metadata(h.state_dir().join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    let toml = std::fs::read_to_string(&config_toml).unwrap();
    assert!(
        toml.contains(&format!("url = \"{}\"", h.server.uri())),
        "{toml}"
    );
    // Shell jobs run through this binary's job-exec as the job user; gitlab-runner, which reads
    // the file, runs as the agent, which owns it.
    let table: toml::Table = toml.parse().unwrap();
    let runner = &table["runners"].as_array().unwrap()[0];
    assert_eq!(runner["executor"].as_str(), Some("custom"), "{toml}");
    let bin = std::fs::canonicalize(common::BIN).unwrap();
    assert_eq!(
        runner["custom"]["run_exec"].as_str(),
        Some(bin.to_str().unwrap()),
        "{toml}"
    );
    let job_user = if nix::unistd::Uid::current().is_root() {
        "nobody".to_string()
    } else {
        nix::unistd::User::from_uid(nix::unistd::Uid::current())
            .unwrap()
            .unwrap()
            .name
    };
    assert_eq!(
        runner["custom"]["run_args"],
        toml::Value::from(vec!["job-exec", "--job-user", job_user.as_str()]),
        "{toml}"
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(&config_toml).unwrap().uid(),
        nix::unistd::Uid::current().as_raw()
    );

    assert!(h.powered_off());
    let st = h.status();
    assert_eq!(st["phase"], "powering-off");
    assert_eq!(st["registered"], true);
    assert_eq!(st["deregistered"], true);
    let phases = h.phases();
    assert_eq!(
        phases,
        [
            "waiting-for-config",
            "registering",
            "running",
            "deregistering",
            "powering-off"
        ]
    );

    // gitlab-runner's output reaches the agent's log, with the token masked.
    let log = h.log();
    assert!(log.contains("fake gitlab-runner: starting job"), "{log}");
    assert!(
        log.contains("fake gitlab-runner: using token = \"glrt-…6789\""),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_token_never_appears_whole_in_any_output() {
    let mut h = Harness::new().await;
    h.mount_glrt_happy_path().await;
    // tags with a glrt- token only warn; an echo of the token by gitlab-runner is masked too.
    h.write_config(json!({"token": TOKEN, "tags": ["nix"]}));
    let runner = h.write_fake_runner(FakeRunner::default());
    h.start(&runner, &[]);
    assert!(h.wait_exit().await.success(), "{}", h.log());
    let secret_part = &TOKEN[5..];
    let all = h.all_output();
    assert!(!all.contains(secret_part), "token leaked:\n{all}");
    assert!(all.contains("glrt-…6789"), "{all}");
    assert!(all.contains("$.tags"), "the tags warning is logged:\n{all}");

    // status (human and JSON) and check never show it either.
    for args in [
        vec!["status", "--state-dir"],
        vec!["status", "--json", "--state-dir"],
    ] {
        let out = std::process::Command::new(BIN)
            .args(&args)
            .arg(h.state_dir())
            .output()
            .unwrap();
        assert!(out.status.success());
        assert!(!String::from_utf8_lossy(&out.stdout).contains(secret_part));
    }
    let out = std::process::Command::new(BIN)
        .args(["check", "--config"])
        .arg(h.config_path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("glrt-…6789") && !text.contains(secret_part),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn legacy_registration_token_creates_and_deletes_its_runner() {
    let mut h = Harness::new().await;
    let created = "glrt-t1_created.by.registration";
    mount(
        &h.server,
        "POST",
        "/api/v4/runners",
        ResponseTemplate::new(201)
            .set_body_json(json!({"id": 12345, "token": created, "token_expires_at": null})),
    )
    .await;
    h.mount_runner_deletion().await;
    h.write_config(json!({"registration_token": "GR1348941LeGaCyReGiStRaTiOn", "tags": ["nix", "vm"], "run_untagged": false, "maximum_timeout": 3600}));
    let runner = h.write_fake_runner(FakeRunner::default());
    h.start(&runner, &[]);
    assert!(h.wait_exit().await.success(), "{}", h.log());

    let register = h.requests("POST", "/api/v4/runners").await;
    assert_eq!(register.len(), 1);
    let b = body(&register[0]);
    assert_eq!(b["token"], "GR1348941LeGaCyReGiStRaTiOn");
    assert_eq!(b["description"], "vm-test");
    assert_eq!(b["tag_list"], json!(["nix", "vm"]));
    assert_eq!(b["run_untagged"], false);
    assert_eq!(b["maximum_timeout"], 3600);
    // gitlab-runner got the token GitLab returned, and that runner is deleted at the end.
    let toml = std::fs::read_to_string(h.state_dir().join("config.toml")).unwrap();
    assert!(toml.contains(created), "{toml}");
    let deleted = h.requests("DELETE", "/api/v4/runners").await;
    assert_eq!(deleted.len(), 1);
    assert_eq!(body(&deleted[0]), json!({"token": created}));
    assert_eq!(h.runner_invocations().len(), 1);
    assert!(h.powered_off());
    assert!(!h.all_output().contains("created.by.registration"));
}

#[tokio::test(flavor = "multi_thread")]
async fn legacy_registration_disabled_410_fails_with_the_fix() {
    let mut h = Harness::new().await;
    mount(
        &h.server,
        "POST",
        "/api/v4/runners",
        ResponseTemplate::new(410)
            .set_body_json(json!({"message": "410 Gone - runner registration disallowed"})),
    )
    .await;
    h.write_config(json!({"registration_token": "GR1348941LeGaCyReGiStRaTiOn"}));
    let runner = h.write_fake_runner(FakeRunner::default());
    h.start(&runner, &[]);
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert!(h.runner_invocations().is_empty());
    assert_eq!(
        h.count("POST", "/api/v4/runners").await,
        1,
        "410 is permanent: no retry"
    );
    let error = h.status()["last_error"].as_str().unwrap().to_owned();
    assert!(error.contains("410") && error.contains("glrt-"), "{error}");
    assert!(h.powered_off());
}

#[tokio::test(flavor = "multi_thread")]
async fn access_token_creates_a_project_runner_and_deletes_it() {
    let mut h = Harness::new().await;
    let created = "glrt-t3_created.by.access.token";
    wiremock::Mock::given(method("POST"))
        .and(path("/api/v4/user/runners"))
        .and(header("PRIVATE-TOKEN", "glpat-AcCeSsToKeNvAlUe12345"))
        .respond_with(
            ResponseTemplate::new(201)
                .set_body_json(json!({"id": 9171, "token": created, "token_expires_at": null})),
        )
        .mount(&h.server)
        .await;
    h.mount_runner_deletion().await;
    h.write_config(json!({"access_token": "glpat-AcCeSsToKeNvAlUe12345", "runner_type": "project_type", "project_id": 42, "tags": ["vm"]}));
    let runner = h.write_fake_runner(FakeRunner::default());
    h.start(&runner, &[]);
    assert!(h.wait_exit().await.success(), "{}", h.log());

    let create = h.requests("POST", "/api/v4/user/runners").await;
    assert_eq!(create.len(), 1);
    let b = body(&create[0]);
    assert_eq!(b["runner_type"], "project_type");
    assert_eq!(b["project_id"], 42);
    assert_eq!(b["tag_list"], json!(["vm"]));
    assert!(
        b.get("token").is_none(),
        "the access token travels in the header only"
    );
    let deleted = h.requests("DELETE", "/api/v4/runners").await;
    assert_eq!(body(&deleted[0]), json!({"token": created}));
    assert_eq!(h.runner_invocations().len(), 1);
    assert!(h.powered_off());
    let all = h.all_output();
    assert!(
        !all.contains("AcCeSsToKeNvAlUe") && !all.contains("created.by.access"),
        "{all}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn keep_file_holds_after_deregistration_until_released() {
    let mut h = Harness::new().await;
    std::fs::write(h.keep_file(), "").unwrap();
    h.start_glrt(json!({}), FakeRunner::default(), &[]).await;

    h.wait_until("the hold", |h| h.in_phase("holding")).await;
    // Deregistered before the hold: no ghost runner while a person debugs.
    assert_eq!(h.count("DELETE", MANAGERS).await, 1);
    assert!(h.status()["hold_deadline"].is_string());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!h.powered_off(), "powered off during the hold");

    let out = std::process::Command::new(BIN)
        .args(["release", "--keep-file"])
        .arg(h.keep_file())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!h.keep_file().exists());
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert!(h.powered_off());
    assert!(
        h.log().contains("hold ended: keep file removed"),
        "{}",
        h.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hold_ends_hold_extend_after_it_began_when_the_keep_file_is_older() {
    let mut h = Harness::new().await;
    std::fs::write(h.keep_file(), "").unwrap();
    // A keep file from long ago (a debug image makes it at boot) still gets --hold-extend.
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
    std::fs::File::options()
        .write(true)
        .open(h.keep_file())
        .unwrap()
        .set_modified(old)
        .unwrap();
    let started = std::time::Instant::now();
    h.start_glrt(
        json!({}),
        FakeRunner::default(),
        &["--hold-max", "60", "--hold-extend", "2"],
    )
    .await;
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(2),
        "{}",
        h.log()
    );
    assert!(h.powered_off());
    assert!(
        h.keep_file().exists(),
        "the operator's keep file is left alone"
    );
    assert!(
        h.log().contains("hold ended: its deadline passed"),
        "{}",
        h.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_touch_loop_does_not_hold_past_hold_max() {
    let mut h = Harness::new().await;
    std::fs::write(h.keep_file(), "").unwrap();
    let keep = h.keep_file().to_path_buf();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // A job's background `touch` loop, every 200 ms.
    let toucher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = std::fs::File::options()
                    .write(true)
                    .open(&keep)
                    .and_then(|f| f.set_modified(std::time::SystemTime::now()));
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        })
    };
    let started = std::time::Instant::now();
    h.start_glrt(
        json!({}),
        FakeRunner::default(),
        &["--hold-max", "3", "--hold-extend", "2"],
    )
    .await;
    let exited = tokio::time::timeout(std::time::Duration::from_secs(60), h.wait_exit()).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    toucher.join().unwrap();
    let status = exited.expect("the touch loop held the VM past --hold-max");
    assert!(status.success(), "{}", h.log());
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(3),
        "{}",
        h.log()
    );
    assert!(h.powered_off());
    assert!(
        h.log().contains("hold ended: its deadline passed"),
        "{}",
        h.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rejected_token_403_starts_no_runner_and_powers_off_after_the_failure_delay() {
    let mut h = Harness::new().await;
    h.mount_rejected_token().await;
    h.write_config(json!({"token": TOKEN}));
    let runner = h.write_fake_runner(FakeRunner::default());
    h.start(&runner, &["--failure-delay", "2"]);
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert!(
        h.started.elapsed() >= Duration::from_secs(2),
        "power-off came before the failure delay"
    );

    assert!(
        h.runner_invocations().is_empty(),
        "gitlab-runner was started"
    );
    assert_eq!(
        h.count("POST", VERIFY).await,
        1,
        "403 is permanent: no retry"
    );
    assert!(
        h.requests("DELETE", MANAGERS).await.is_empty(),
        "nothing was registered"
    );
    assert!(h.powered_off());
    let st = h.status();
    let phases = h.phases();
    assert_eq!(
        phases,
        [
            "waiting-for-config",
            "registering",
            "failed",
            "powering-off"
        ]
    );
    let error = st["last_error"].as_str().unwrap();
    assert!(
        error.contains("403") && error.contains("glrt- token"),
        "{error}"
    );
}

/// Answers each request with the next of `answers` (the last one again once they run out) and
/// records when each request came.
struct Timed {
    answers: Vec<ResponseTemplate>,
    arrivals: Arc<Mutex<Vec<Instant>>>,
}

impl wiremock::Respond for Timed {
    fn respond(&self, _: &wiremock::Request) -> ResponseTemplate {
        let mut arrivals = self.arrivals.lock().unwrap();
        arrivals.push(Instant::now());
        let i = (arrivals.len() - 1).min(self.answers.len() - 1);
        self.answers[i].clone()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn server_errors_and_429_are_retried_no_sooner_than_the_floor_and_retry_after() {
    let mut h = Harness::new().await;
    // A 503 without a hint, then a 429 asking for 2 s (longer than the 1 s floor, so that the
    // two waits tell the floor from Retry-After), then success.
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    wiremock::Mock::given(method("POST"))
        .and(path(VERIFY))
        .respond_with(Timed {
            answers: vec![
                ResponseTemplate::new(503),
                ResponseTemplate::new(429)
                    .insert_header("Retry-After", "2")
                    .set_body_json(
                        json!({"message": "Executing database migrations. Please retry later."}),
                    ),
                ResponseTemplate::new(200)
                    .set_body_json(json!({"id": 7, "token": TOKEN, "token_expires_at": null})),
            ],
            arrivals: arrivals.clone(),
        })
        .with_priority(1)
        .mount(&h.server)
        .await;
    h.start_glrt(json!({}), FakeRunner::default(), &[]).await;
    assert!(h.wait_exit().await.success(), "{}", h.log());

    let at = arrivals.lock().unwrap().clone();
    assert_eq!(at.len(), 3, "{}", h.log());
    let floor = at[1] - at[0];
    let retry_after = at[2] - at[1];
    assert!(
        floor >= Duration::from_secs(1),
        "retried {floor:?} after the 503, sooner than the 1 s floor\n{}",
        h.log()
    );
    assert!(
        retry_after >= Duration::from_secs(2),
        "retried {retry_after:?} after the 429, before its Retry-After: 2\n{}",
        h.log()
    );
    assert_eq!(h.runner_invocations().len(), 1);
    assert!(h.powered_off());
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_gitlab_at_deregistration_delays_power_off_by_at_most_the_timeout() {
    let mut h = Harness::new().await;
    mount(
        &h.server,
        "POST",
        VERIFY,
        ResponseTemplate::new(200).set_body_json(json!({"id": 7, "token": TOKEN})),
    )
    .await;
    // The deletion hangs far longer than --deregister-timeout.
    mount(
        &h.server,
        "DELETE",
        MANAGERS,
        ResponseTemplate::new(204).set_delay(Duration::from_secs(120)),
    )
    .await;
    h.write_config(json!({"token": TOKEN}));
    let runner = h.write_fake_runner(FakeRunner::default());
    h.start(&runner, &["--deregister-timeout", "2"]);
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert!(h.powered_off());
    assert!(
        h.started.elapsed() < Duration::from_secs(25),
        "power-off waited for the hanging GitLab"
    );
    let st = h.status();
    assert_eq!(st["deregistered"], false);
    assert!(
        st["last_error"]
            .as_str()
            .unwrap()
            .contains("could not delete"),
        "{st}"
    );
}

/// A TCP forwarder to the fake GitLab that can be shut down, after which every connection to
/// its port is refused, as when GitLab is down.
async fn start_forwarder(target: String) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let (mut inbound, _) = listener.accept().await.unwrap();
            let target = target.clone();
            conns.spawn(async move {
                let mut outbound = tokio::net::TcpStream::connect(target).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    (format!("http://{addr}"), task)
}

#[tokio::test(flavor = "multi_thread")]
async fn gitlab_refusing_connections_at_deregistration_is_retried_then_given_up() {
    let mut h = Harness::new().await;
    h.mount_glrt_happy_path().await;
    let (url, forwarder) = start_forwarder(h.server.address().to_string()).await;
    h.write_config(json!({"token": TOKEN, "url": url}));
    let runner = h.write_fake_runner(FakeRunner::job(2));
    h.start(&runner, &["--deregister-timeout", "3"]);
    h.wait_for_job().await;
    // GitLab goes away while the job runs: every connection is refused from now on.
    forwarder.abort();
    let _ = forwarder.await;
    assert!(std::net::TcpStream::connect(url.trim_start_matches("http://")).is_err());
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert!(h.powered_off());
    assert!(h.requests("DELETE", MANAGERS).await.is_empty());
    let log = h.log();
    assert!(
        log.contains("cannot reach GitLab") && log.contains("retry 1"),
        "{log}"
    );
    assert!(log.contains("could not delete runner manager"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_mid_job_aborts_the_job_deregisters_and_exits_without_power_off() {
    let mut h = Harness::new().await;
    h.start_glrt(json!({}), FakeRunner::job(60), &[]).await;
    h.wait_for_job().await;
    send_signal(h.agent_pid(), 15);
    let status = h.wait_exit().await;
    assert!(status.success(), "{status:?}\n{}", h.log());
    assert_eq!(h.runner_signals().trim(), "TERM");
    assert_eq!(h.count("DELETE", MANAGERS).await, 1);
    assert!(
        !h.powered_off(),
        "the platform powers the VM off, not the agent"
    );
    assert_eq!(h.status()["phase"], "stopping");
}

#[tokio::test(flavor = "multi_thread")]
async fn drain_lets_the_job_finish_then_tears_down() {
    let mut h = Harness::new().await;
    h.start_glrt(json!({"max_jobs": 5}), FakeRunner::job(2), &[])
        .await;
    h.wait_for_job().await;
    h.drain();
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert_eq!(h.runner_signals().trim(), "QUIT");
    assert!(
        h.log().contains("fake gitlab-runner: drained"),
        "{}",
        h.log()
    );
    assert_eq!(h.count("DELETE", MANAGERS).await, 1);
    assert!(h.powered_off());
    let phases = h.phases();
    assert_eq!(
        phases,
        [
            "waiting-for-config",
            "registering",
            "running",
            "draining",
            "deregistering",
            "powering-off"
        ]
    );
}

/// An agent started with the stop signals ignored (from `nohup`, a shell script that ignores
/// them, a supervisor other than systemd) still stops gitlab-runner: the signals it sends are
/// not ignored in the child (a shell, as gitlab-runner's wrapper may be, cannot even trap a
/// signal ignored at its start).
#[tokio::test(flavor = "multi_thread")]
async fn stop_signals_ignored_by_whoever_started_the_agent_still_reach_gitlab_runner() {
    for (how, expected) in [("drain", "QUIT"), ("sigterm", "TERM")] {
        let mut h = Harness::new().await;
        h.prepare_glrt(json!({})).await;
        let runner = h.write_fake_runner(FakeRunner::job(3));
        let mut cmd = h.command(&runner, &[]);
        // SAFETY: only signal dispositions change between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                use nix::sys::signal::{SigHandler, Signal, signal};
                for sig in [
                    Signal::SIGQUIT,
                    Signal::SIGTERM,
                    Signal::SIGINT,
                    Signal::SIGHUP,
                ] {
                    signal(sig, SigHandler::SigIgn)?;
                }
                Ok(())
            });
        }
        h.agent = Some(cmd.spawn().unwrap());
        h.wait_for_job().await;
        if how == "drain" {
            h.drain();
        } else {
            send_signal(h.agent_pid(), 15);
        }
        assert!(h.wait_exit().await.success(), "{how}: {}", h.log());
        assert_eq!(h.runner_signals().trim(), expected, "{how}: {}", h.log());
        assert_eq!(h.count("DELETE", MANAGERS).await, 1, "{how}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn max_lifetime_drains_at_its_deadline() {
    let mut h = Harness::new().await;
    h.start_glrt(json!({"max_lifetime": 1}), FakeRunner::job(3), &[])
        .await;
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert_eq!(h.runner_signals().trim(), "QUIT");
    assert!(
        h.log().contains("max_lifetime of 1 s reached"),
        "{}",
        h.log()
    );
    assert!(h.powered_off());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_agent_never_starts_a_second_gitlab_runner() {
    let mut h = Harness::new().await;
    let runner = h.start_glrt(json!({}), FakeRunner::job(60), &[]).await;
    h.wait_for_job().await;
    let system_id = h.system_id_file();
    // The agent crashes (SIGKILL: no teardown at all), and systemd kills the rest of the unit.
    h.crash(&runner).await;

    h.start(&runner, &[]);
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert_eq!(
        h.runner_invocations().len(),
        1,
        "a second gitlab-runner was started"
    );
    assert_eq!(h.count("POST", VERIFY).await, 1);
    let deleted = h.requests("DELETE", MANAGERS).await;
    assert_eq!(deleted.len(), 1);
    assert_eq!(
        body(&deleted[0])["system_id"],
        system_id.as_str(),
        "the manager of the first run is the one deleted"
    );
    assert!(h.powered_off());
    assert!(
        h.log()
            .contains("tearing down instead of starting another gitlab-runner"),
        "{}",
        h.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_gitlab_runner_fails_deregisters_and_powers_off() {
    let mut h = Harness::new().await;
    h.prepare_glrt(json!({})).await;
    let missing = h.path("no-such-gitlab-runner");
    h.start(&missing, &[]);
    assert!(h.wait_exit().await.success(), "{}", h.log());
    let st = h.status();
    assert!(
        st["last_error"]
            .as_str()
            .unwrap()
            .contains("gitlab-runner not found"),
        "{st}"
    );
    // It had registered, so it deregisters before powering off.
    assert_eq!(h.count("DELETE", MANAGERS).await, 1);
    assert!(h.powered_off());
}

#[tokio::test(flavor = "multi_thread")]
async fn gitlab_runner_failing_at_once_is_a_failure() {
    let mut h = Harness::new().await;
    h.start_glrt(
        json!({}),
        FakeRunner {
            job_seconds: 0,
            exit_code: 1,
        },
        &[],
    )
    .await;
    assert!(h.wait_exit().await.success(), "{}", h.log());
    let st = h.status();
    assert!(
        st["last_error"].as_str().unwrap().contains("exit code 1"),
        "{st}"
    );
    assert_eq!(h.count("DELETE", MANAGERS).await, 1);
    assert!(h.powered_off());
}

#[tokio::test(flavor = "multi_thread")]
async fn config_arriving_late_is_waited_for() {
    let mut h = Harness::new().await;
    h.mount_glrt_happy_path().await;
    let runner = h.write_fake_runner(FakeRunner::default());
    h.start(&runner, &[]);
    h.wait_until("waiting-for-config", |h| h.in_phase("waiting-for-config"))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(h.requests("POST", VERIFY).await.is_empty());
    // The config disk appears: its directory and then the file.
    h.write_config(json!({"token": TOKEN}));
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert_eq!(h.runner_invocations().len(), 1);
    assert!(h.powered_off());
}

#[tokio::test(flavor = "multi_thread")]
async fn config_never_arriving_fails_after_config_wait() {
    let mut h = Harness::new().await;
    let runner = h.write_fake_runner(FakeRunner::default());
    h.start(&runner, &["--config-wait", "1"]);
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert!(h.runner_invocations().is_empty());
    assert!(h.last_error().contains("did not appear within 1 s"));
    assert!(h.powered_off());
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_config_fails_with_every_problem_named() {
    let mut h = Harness::new().await;
    h.write_config(json!({"token": TOKEN, "exector": "shell", "url": "gitlab.example.com"}));
    let runner = h.write_fake_runner(FakeRunner::default());
    h.start(&runner, &[]);
    assert!(h.wait_exit().await.success(), "{}", h.log());
    let error = h.status()["last_error"].as_str().unwrap().to_owned();
    assert!(
        error.contains("$.exector")
            && error.contains("$.url")
            && error.contains("gitlab-runner-vm check"),
        "{error}"
    );
    assert!(h.server.received_requests().await.unwrap().is_empty());
    assert!(h.powered_off());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_power_off_is_resumed_by_the_restarted_agent_without_registering_again() {
    let mut h = Harness::new().await;
    h.mount_rejected_token().await;
    h.write_config(json!({"token": TOKEN}));
    let runner = h.write_fake_runner(FakeRunner::default());
    // The power-off command fails: the agent exits 1, so systemd restarts it.
    h.start(&runner, &["--poweroff-command", "exit 3"]);
    let status = h.wait_exit().await;
    assert_eq!(status.code(), Some(1), "{}", h.log());
    assert!(h.last_error().contains("power-off command"));

    h.start(&runner, &[]);
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert!(h.powered_off());
    assert_eq!(
        h.count("POST", VERIFY).await,
        1,
        "registered again after a restart"
    );
    assert!(h.log().contains("began its teardown"), "{}", h.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn no_poweroff_tears_down_and_exits_without_the_power_off_command() {
    let mut h = Harness::new().await;
    h.start_glrt(json!({}), FakeRunner::default(), &["--no-poweroff"])
        .await;
    let status = h.wait_exit().await;
    assert!(status.success(), "exit {status:?}\n{}", h.log());
    assert_eq!(h.count("DELETE", MANAGERS).await, 1);
    assert!(!h.powered_off(), "the power-off command ran:\n{}", h.log());
    assert!(h.log().contains("--no-poweroff"), "{}", h.log());
    assert_eq!(h.status()["phase"], "powering-off");
}
