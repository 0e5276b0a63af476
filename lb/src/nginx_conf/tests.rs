//! Translations of whole configs, and the errors bad ones get, line numbers included.

use super::*;
use crate::config::{Algorithm, Config};
use common::ConfigSource;
use std::time::Duration;

#[test]
fn the_shared_example_is_accepted_unchanged() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/examples/nginx.conf"
    ))
    .or_else(|_| std::fs::read_to_string("/work/shared/examples/nginx.conf"))
    .expect("shared example nginx.conf");
    let t = translate(&text).unwrap();
    let c: Config = ConfigSource::new().base(t.table.clone()).load().unwrap();
    assert_eq!(c.listen, "0.0.0.0:8080");
    assert_eq!(c.upstream.name, "flask_app");
    assert_eq!(c.upstream.algorithm, Algorithm::IpHash);
    assert_eq!(c.upstream.servers.len(), 2);
    assert_eq!(c.upstream.servers[0].addr, "web1:5000");
    assert_eq!(c.upstream.servers[1].max_fails, 3);
    assert_eq!(c.upstream.servers[1].fail_timeout.get().as_secs(), 30);
    assert_eq!(c.timeouts.upstream_response.get().as_secs(), 86400);
    assert_eq!(c.timeouts.upgraded_idle.get().as_secs(), 86400);
    assert_eq!(c.timeouts.client_idle.get().as_secs(), 65);
    // `worker_processes auto`: one serving thread per core.
    assert_eq!(c.workers, 0);
    let w = t.warnings.join("\n");
    assert!(w.contains("line 3: `user` ignored"), "{w}");
    assert!(w.contains("line 7: `events` ignored"), "{w}");
    assert!(w.contains("`proxy_http_version` ignored"), "{w}");
}

#[test]
fn upstream_parameters_and_methods() {
    let t = translate(
        "http { upstream u { hash $cookie_sid consistent; keepalive 16;\n\
         server 127.0.0.1:1 weight=5 max_fails=2 fail_timeout=5s;\n\
         server 127.0.0.1:2 down; }\n\
         server { listen 127.0.0.1:9000; location / { proxy_pass http://u/; proxy_next_upstream error timeout http_502; } } }",
    )
    .unwrap();
    let c: Config = ConfigSource::new().base(t.table).load().unwrap();
    assert_eq!(c.upstream.algorithm, Algorithm::Hash);
    assert_eq!(c.upstream.hash_key, "$cookie_sid");
    assert_eq!(c.upstream.servers[0].weight, 5);
    assert!(c.upstream.servers[1].down);
    assert_eq!(c.limits.upstream_keepalive, 16);
    assert_eq!(c.listen, "127.0.0.1:9000");
    assert!(c.retry.on_status);
    let t = translate("http { upstream u { least_conn; server a:1; server b:2 backup; }\n server { listen 80; location / { proxy_pass http://u; } } }").unwrap();
    let c: Config = ConfigSource::new().base(t.table).load().unwrap();
    assert_eq!(c.upstream.algorithm, Algorithm::LeastConn);
    assert!(c.upstream.servers[1].backup);
    let conf = |w: &str| {
        format!("worker_processes {w};\nhttp {{ upstream u {{ server a:1; }}\n server {{ listen 80; location / {{ proxy_pass http://u; }} }} }}")
    };
    let c: Config = ConfigSource::new()
        .base(translate(&conf("2")).unwrap().table)
        .load()
        .unwrap();
    assert_eq!(c.workers, 2);
    let e = translate(&conf("0")).unwrap_err().to_string();
    assert!(e.contains("line 1") && e.contains("worker_processes"), "{e}");
}

#[test]
fn unsupported_directives_name_their_line() {
    let e = translate("http {\n server {\n listen 80;\n location / {\n proxy_pass http://u;\n try_files $uri =404;\n }\n }\n}")
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 6") && e.contains("try_files"), "{e}");
    let e = translate("http {\n upstream u { server a:1 wieght=2; }\n server { listen 80; location / { proxy_pass http://u; } } }")
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 2") && e.contains("wieght=2"), "{e}");
    let e = translate("http {\n server { listen 80;\n location @api { proxy_pass http://u; } } }")
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 3") && e.contains("named locations"), "{e}");
    let e = translate("http {\n server { listen 80;\n location / {\n location /a { } } } }")
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 4") && e.contains("nested"), "{e}");
    let e = translate("http {\n server { listen 80;\n location ~ ^/a { proxy_pass http://u/x/; } } }")
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 3") && e.contains("URI part"), "{e}");
    let e = translate("http {\n server { listen 80;\n return 444; } }")
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 3") && e.contains("444"), "{e}");
    let e = translate("http {\n server { listen 80;\n rewrite ^ /x sideways; } }")
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 3") && e.contains("sideways"), "{e}");
    let e = translate("http { server { listen 443 ssl; } }")
        .unwrap_err()
        .to_string();
    assert!(e.contains("ssl_certificate"), "{e}");
    let e = translate("http {\n ssl_protocols TLSv1 TLSv1.1;\n server { listen 443 ssl; } }")
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 2") && e.contains("TLSv1.2"), "{e}");
}

#[test]
fn syntax_errors_name_their_line() {
    let e = translate("http {\n upstream u {\n server a:1\n }\n}")
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 4") && e.contains("missing its `;`"), "{e}");
    let e = translate("http {\n server {\n").unwrap_err().to_string();
    assert!(e.contains("unclosed"), "{e}");
    let e = translate("}").unwrap_err().to_string();
    assert!(e.contains("unexpected"), "{e}");
    let e = translate("user \"www;\n").unwrap_err().to_string();
    assert!(e.contains("unclosed quote"), "{e}");
    assert!(translate("http { }").is_err());
}

#[test]
fn proxy_pass_to_an_address_makes_a_one_server_upstream() {
    let t = translate("http { server { listen 8081; location / { proxy_pass http://127.0.0.1:5000; } } }")
        .unwrap();
    let c: Config = ConfigSource::new().base(t.table).load().unwrap();
    assert_eq!(c.upstream.servers.len(), 1);
    assert_eq!(c.upstream.servers[0].addr, "127.0.0.1:5000");
}

#[test]
fn servers_locations_rewrites_and_returns() {
    let t = translate(
        "http {\n upstream app { server 127.0.0.1:1; }\n upstream api { least_conn; server 127.0.0.1:2; }\n\
         server { listen 80 default_server; server_name example.com *.example.com;\n\
           rewrite ^/old/(.*)$ /new/$1 last;\n\
           location / { proxy_pass http://app; }\n\
           location ^~ /api/ { proxy_pass http://api/v1/; }\n\
           location ~* \\.png$ { proxy_pass http://127.0.0.1:3; }\n\
           location = /ping { return 200 pong; }\n }\n\
         server { listen 81; return 301 https://$host$request_uri; }\n}",
    )
    .unwrap();
    let c: Config = ConfigSource::new().base(t.table).load().unwrap();
    assert_eq!(c.listen, "0.0.0.0:80");
    assert_eq!(c.listen_addrs(), ["0.0.0.0:80", "0.0.0.0:81"]);
    assert_eq!(c.upstream.name, "app");
    let names: Vec<_> = c.upstreams.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(names, ["api", "127.0.0.1:3"]);
    assert_eq!(c.upstreams[0].algorithm, Algorithm::LeastConn);
    let v = &c.vhosts[0];
    assert!(v.default_server);
    assert_eq!(v.names, ["example.com", "*.example.com"]);
    assert_eq!(v.rewrites[0].flag, crate::config::RewriteFlag::Last);
    assert_eq!(v.locations.len(), 4);
    assert_eq!(v.locations[1].match_, crate::config::LocationMatch::PrefixNoRegex);
    assert_eq!(v.locations[1].proxy_pass, "http://api/v1/");
    assert_eq!(v.locations[3].return_.as_ref().unwrap().text, "pong");
    assert_eq!(c.vhosts[1].return_.as_ref().unwrap().status, 301);
    assert_eq!(c.vhosts[1].listen, ["0.0.0.0:81"]);
}

#[test]
fn tls_servers() {
    let t = translate(
        "http {\n upstream app { server 127.0.0.1:1; }\n ssl_protocols TLSv1 TLSv1.2 TLSv1.3;\n\
         ssl_certificate /etc/ssl/default.pem; ssl_certificate_key /etc/ssl/default.key;\n\
         ssl_session_cache shared:SSL:10m;\n\
         server { listen 80; listen 443 ssl http2; server_name a.test;\n\
           location / { proxy_pass http://app; } }\n\
         server { listen 443 ssl; server_name b.test; ssl_certificate /b.pem; ssl_certificate_key /b.key;\n\
           ssl_stapling on; ssl_stapling_file /b.ocsp;\n\
           location / { proxy_pass http://app; } }\n}",
    )
    .unwrap();
    let c: Config = ConfigSource::new().base(t.table).load().unwrap();
    assert_eq!(c.listen_addrs(), ["0.0.0.0:80", "0.0.0.0:443"]);
    let a = c.vhosts[0].tls.as_ref().unwrap();
    assert_eq!(c.vhosts[0].listen, ["0.0.0.0:80"]);
    assert_eq!(a.listen, ["0.0.0.0:443"]);
    assert_eq!(
        (a.certificate.as_str(), a.key.as_str()),
        ("/etc/ssl/default.pem", "/etc/ssl/default.key")
    );
    assert_eq!(a.protocols, ["TLSv1.2", "TLSv1.3"]);
    let b = c.vhosts[1].tls.as_ref().unwrap();
    assert_eq!(b.certificate, "/b.pem");
    assert_eq!(b.ocsp_file, "/b.ocsp");
    assert!(a.ocsp_file.is_empty());
    assert!(c.vhosts[1].listen.is_empty());
    let w = t.warnings.join("\n");
    assert!(w.contains("line 3: ssl_protocols `TLSv1` ignored"), "{w}");
    assert!(w.contains("`ssl_session_cache` ignored"), "{w}");
}

#[test]
fn grpc_pass_becomes_a_grpc_proxy_pass_and_its_limits_name_their_line() {
    let t = translate(
        "http {\n upstream app { server 127.0.0.1:1; }\n upstream rpc { server 127.0.0.1:2; }\n\
         server { listen 80;\n location / { proxy_pass http://app; }\n\
           location /svc.Echo/ { grpc_pass grpc://rpc; }\n\
           location /svc.Other/ { grpc_pass 127.0.0.1:3; } } }",
    )
    .unwrap();
    let c: Config = ConfigSource::new().base(t.table).load().unwrap();
    let v = &c.vhosts[0];
    assert_eq!(v.locations[1].proxy_pass, "grpc://rpc");
    assert_eq!(v.locations[2].proxy_pass, "grpc://127.0.0.1:3");
    for (conf, words) in [
        ("location / {\n grpc_pass grpcs://rpc; }", "grpcs://"),
        ("location / {\n grpc_pass grpc://$backend; }", "variables"),
        ("location / {\n grpc_pass grpc://rpc/x; }", "URI part"),
        (
            "location / { proxy_pass http://rpc;\n grpc_pass grpc://rpc; }",
            "beside proxy_pass",
        ),
    ] {
        let e = translate(&format!(
            "http {{ upstream rpc {{ server 127.0.0.1:2; }}\n server {{ listen 80;\n {conf} }} }}"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("line 4") && e.contains(words), "{conf}: {e}");
    }
}

#[test]
fn grpc_timeouts_retries_and_headers_read_as_their_proxy_twins() {
    let t = translate(
        "http {\n upstream rpc { server 127.0.0.1:2; }\n server { listen 80 http2;\n\
           location / { grpc_pass grpc://rpc;\n grpc_read_timeout 300s; grpc_connect_timeout 2s;\n\
             grpc_send_timeout 300s; grpc_next_upstream error timeout http_502;\n\
             grpc_next_upstream_tries 2; grpc_next_upstream_timeout 5s;\n\
             grpc_set_header X-Real-IP $remote_addr; grpc_buffer_size 8k;\n\
             grpc_set_header X-Custom abc; } } }",
    )
    .unwrap();
    let c: Config = ConfigSource::new().base(t.table).load().unwrap();
    assert_eq!(c.timeouts.upstream_response.0, Duration::from_secs(300));
    assert_eq!(c.timeouts.upgraded_idle.0, Duration::from_secs(300));
    assert_eq!(c.timeouts.upstream_connect.0, Duration::from_secs(2));
    assert_eq!(c.retry.tries, 2);
    assert!(c.retry.on_status);
    assert_eq!(c.retry.timeout.0, Duration::from_secs(5));
    let w = t.warnings.join("\n");
    assert!(w.contains("line 6: `grpc_send_timeout` ignored"), "{w}");
    assert!(
        w.contains("line 9: `grpc_set_header` ignored: custom upstream headers"),
        "{w}"
    );
    let e = translate("http { server { listen 80;\n location / { grpc_next_upstream_tries x; } } }")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("line 2") && e.contains("`grpc_next_upstream_tries` needs a number"),
        "{e}"
    );
}
