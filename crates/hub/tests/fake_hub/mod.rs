//! A local stand-in for the Hugging Face Hub, started by the tests: it serves folders as model
//! repos and answers the requests `hf-hub` makes the way huggingface.co does: the model-info API
//! (`/api/models/{repo}/revision/{revision}`), `resolve` URLs with `X-Repo-Commit` and `ETag`
//! headers, `302` redirects of weight files to a CDN URL carrying `X-Linked-Etag` and
//! `X-Linked-Size`, `Range` requests answered with `206` and `Content-Range`, and the Hub's error
//! answers (`404` + `X-Error-Code: RepoNotFound` / `EntryNotFound` / `RevisionNotFound`, `401` +
//! `GatedRepo` for a gated repo without a valid token). It can cut a file's body off halfway, and
//! it records every request.
//!
//! Shared by the hub crate's tests and the binary's integration tests (`#[path]`).

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// The path without the query.
    pub path: String,
    pub range: Option<String>,
    pub authorization: Option<String>,
}

struct Repo {
    commit: String,
    files: BTreeMap<String, Vec<u8>>,
    /// A gated repo answers only requests with `Authorization: Bearer <token>`.
    token: Option<String>,
}

#[derive(Default)]
struct State {
    repos: HashMap<String, Repo>,
    requests: Vec<Request>,
    /// File name -> how many more body downloads of it are cut off halfway.
    cut: HashMap<String, usize>,
}

/// The running server; it lives until the test process ends.
#[derive(Clone)]
pub struct FakeHub {
    port: u16,
    state: Arc<Mutex<State>>,
}

impl FakeHub {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a local port");
        let port = listener.local_addr().unwrap().port();
        let hub = Self {
            port,
            state: Arc::default(),
        };
        let server = hub.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let server = server.clone();
                std::thread::spawn(move || server.handle(stream));
            }
        });
        hub
    }

    /// What `HF_ENDPOINT` should be.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Serves every file under `folder` as the repo `repo_id` at `commit` (40 hex digits);
    /// `token`: the repo is gated and needs this token.
    pub fn add_repo(&self, repo_id: &str, commit: &str, folder: &Path, token: Option<&str>) {
        self.add_files(repo_id, commit, folder_files(folder), token);
    }

    /// Serves `files` (repo path -> contents) as the repo `repo_id`.
    pub fn add_files(
        &self,
        repo_id: &str,
        commit: &str,
        files: BTreeMap<String, Vec<u8>>,
        token: Option<&str>,
    ) {
        self.state.lock().unwrap().repos.insert(
            repo_id.to_string(),
            Repo {
                commit: commit.to_string(),
                files,
                token: token.map(str::to_string),
            },
        );
    }

    /// The next `times` downloads of `file` (a repo path) send half the body, then hang up.
    pub fn cut_off(&self, file: &str, times: usize) {
        self.state
            .lock()
            .unwrap()
            .cut
            .insert(file.to_string(), times);
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Request> {
        self.state.lock().unwrap().requests.clone()
    }

    fn handle(&self, mut stream: TcpStream) {
        let Some(request) = read_request(&stream) else {
            return;
        };
        self.state.lock().unwrap().requests.push(request.clone());
        let answer = self.answer(&request);
        let _ = write_answer(&mut stream, &request, answer);
        let _ = stream.flush();
        let _ = stream.shutdown(Shutdown::Both);
    }

    fn answer(&self, request: &Request) -> Answer {
        let mut state = self.state.lock().unwrap();
        let path = percent_decode(&request.path);
        if let Some(rest) = path.strip_prefix("/api/models/") {
            let Some((repo_id, revision)) = rest.split_once("/revision/") else {
                return Answer::error(404, "RepoNotFound", "Repository not found");
            };
            let repo = match state.find(repo_id, revision, request) {
                Ok(repo) => repo,
                Err(answer) => return answer,
            };
            let siblings: Vec<serde_json::Value> = repo
                .files
                .iter()
                .map(|(name, data)| serde_json::json!({"rfilename": name, "size": data.len()}))
                .collect();
            let body = serde_json::json!({
                "id": repo_id, "modelId": repo_id, "sha": repo.commit, "siblings": siblings,
            });
            return Answer::ok(body.to_string().into_bytes(), Vec::new());
        }
        if let Some(rest) = path.strip_prefix("/cdn/") {
            // /cdn/{org}/{name}/{commit}/{file}
            let parts: Vec<&str> = rest.splitn(4, '/').collect();
            if parts.len() != 4 {
                return Answer::error(404, "EntryNotFound", "no such object");
            }
            let repo_id = format!("{}/{}", parts[0], parts[1]);
            let Some(data) = state
                .repos
                .get(&repo_id)
                .and_then(|repo| repo.files.get(parts[3]).cloned())
            else {
                return Answer::error(404, "EntryNotFound", "no such object");
            };
            return state.body(request, parts[3], data, Vec::new());
        }
        // /{org}/{name}/resolve/{revision}/{file}
        let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
        if parts.len() != 5 || parts[2] != "resolve" {
            return Answer::error(404, "RepoNotFound", "Repository not found");
        }
        let repo_id = format!("{}/{}", parts[0], parts[1]);
        let file = parts[4].to_string();
        let repo = match state.find(&repo_id, parts[3], request) {
            Ok(repo) => repo,
            Err(answer) => return answer,
        };
        let Some(data) = repo.files.get(&file).cloned() else {
            return Answer::error(404, "EntryNotFound", "Entry not found");
        };
        let commit = repo.commit.clone();
        let etag = etag_of(&data);
        if file.ends_with(".safetensors") {
            // Weights live in LFS: the Hub redirects to the CDN and names the blob in headers.
            let location = format!("{}/cdn/{repo_id}/{commit}/{file}", self.endpoint());
            return Answer {
                status: 302,
                headers: vec![
                    ("Location".into(), location),
                    ("X-Repo-Commit".into(), commit),
                    ("X-Linked-Etag".into(), format!("\"{etag}\"")),
                    ("X-Linked-Size".into(), data.len().to_string()),
                    ("ETag".into(), "\"pointer\"".into()),
                ],
                body: Vec::new(),
                cut: false,
            };
        }
        let headers = vec![
            ("X-Repo-Commit".into(), commit),
            ("ETag".into(), format!("\"{etag}\"")),
        ];
        state.body(request, &file, data, headers)
    }
}

impl State {
    /// The repo at `revision` as `request` may see it, or the Hub's error answer.
    fn find(&self, repo_id: &str, revision: &str, request: &Request) -> Result<&Repo, Answer> {
        let Some(repo) = self.repos.get(repo_id) else {
            return Err(Answer::error(404, "RepoNotFound", "Repository not found"));
        };
        if let Some(token) = &repo.token {
            if request.authorization.as_deref() != Some(&format!("Bearer {token}")) {
                return Err(Answer::error(
                    401,
                    "GatedRepo",
                    "Access to this model is restricted. You must have access to it and be authenticated to access it. Please log in.",
                ));
            }
        }
        if revision != "main" && revision != repo.commit {
            return Err(Answer::error(404, "RevisionNotFound", "Invalid rev id"));
        }
        Ok(repo)
    }

    /// A file body, with `Range` support (filled in by `write_answer`), cut off when asked
    /// (but never the one-byte probe `hf-hub` sends first for the file's size).
    fn body(
        &mut self,
        request: &Request,
        file: &str,
        data: Vec<u8>,
        headers: Vec<(String, String)>,
    ) -> Answer {
        let mut cut = false;
        let probe = request.range.as_deref() == Some("bytes=0-0");
        if let Some(left) = self.cut.get_mut(file).filter(|_| !probe) {
            if *left > 0 {
                *left -= 1;
                cut = true;
            }
        }
        Answer {
            status: 200,
            headers,
            body: data,
            cut,
        }
    }
}

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Send half of the (ranged) body, then hang up.
    cut: bool,
}

impl Answer {
    fn ok(body: Vec<u8>, headers: Vec<(String, String)>) -> Self {
        Self {
            status: 200,
            headers,
            body,
            cut: false,
        }
    }

    fn error(status: u16, code: &str, message: &str) -> Self {
        Self {
            status,
            headers: vec![
                ("X-Error-Code".into(), code.into()),
                ("X-Error-Message".into(), message.into()),
            ],
            body: format!("{{\"error\":\"{message}\"}}").into_bytes(),
            cut: false,
        }
    }
}

fn write_answer(stream: &mut TcpStream, request: &Request, answer: Answer) -> std::io::Result<()> {
    let mut status = answer.status;
    let mut headers = answer.headers;
    let mut body = answer.body;
    if status == 200 {
        if let Some((start, end)) = request
            .range
            .as_deref()
            .and_then(|r| parse_range(r, body.len()))
        {
            headers.push((
                "Content-Range".into(),
                format!("bytes {start}-{end}/{}", body.len()),
            ));
            body = body[start..=end].to_vec();
            status = 206;
        } else if request.range.is_some() && !body.is_empty() {
            // A range past the end of the file.
            headers.push(("Content-Range".into(), format!("bytes */{}", body.len())));
            status = 416;
            body.clear();
        }
    }
    let reason = match status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        _ => "Other",
    };
    let mut head = format!("HTTP/1.1 {status} {reason}\r\n");
    for (name, value) in &headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    stream.write_all(head.as_bytes())?;
    if request.method == "HEAD" {
        return Ok(());
    }
    if answer.cut && body.len() > 1 {
        stream.write_all(&body[..body.len() / 2])?;
        return Ok(());
    }
    stream.write_all(&body)
}

/// `bytes=a-b` or `bytes=a-` as an inclusive range inside `len` bytes.
fn parse_range(range: &str, len: usize) -> Option<(usize, usize)> {
    let spec = range.trim().strip_prefix("bytes=")?;
    let (start, end) = spec.split_once('-')?;
    let start: usize = start.parse().ok()?;
    let end = if end.is_empty() {
        len.checked_sub(1)?
    } else {
        end.parse::<usize>().ok()?.min(len.checked_sub(1)?)
    };
    (start <= end).then_some((start, end))
}

fn read_request(stream: &TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut words = line.split_whitespace();
    let method = words.next()?.to_string();
    let target = words.next()?;
    let path = target.split('?').next().unwrap_or(target).to_string();
    let (mut range, mut authorization) = (None, None);
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).ok()? == 0 {
            break;
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            match name.trim().to_ascii_lowercase().as_str() {
                "range" => range = Some(value.trim().to_string()),
                "authorization" => authorization = Some(value.trim().to_string()),
                _ => {}
            }
        }
    }
    Some(Request {
        method,
        path,
        range,
        authorization,
    })
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(value) = u8::from_str_radix(&text[i + 1..i + 3], 16) {
                out.push(value);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A stable hex name for a blob (FNV-1a, twice, as 32 hex digits).
fn etag_of(data: &[u8]) -> String {
    let mut a: u64 = 0xcbf2_9ce4_8422_2325;
    let mut b: u64 = 0x8422_2325_cbf2_9ce4;
    for &byte in data {
        a = (a ^ byte as u64).wrapping_mul(0x0100_0000_01b3);
        b = (b ^ byte as u64).wrapping_mul(0x0000_0100_0000_01b3 ^ 0x10);
    }
    format!("{a:016x}{b:016x}{:08x}", data.len())
}

/// Every file under `folder`: repo path -> contents.
pub fn folder_files(folder: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    collect(folder, "", &mut files);
    files
}

fn collect(dir: &Path, prefix: &str, files: &mut BTreeMap<String, Vec<u8>>) {
    for entry in std::fs::read_dir(dir).expect("a fixture folder") {
        let entry = entry.unwrap();
        let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
        let path = entry.path();
        if path.is_dir() {
            collect(&path, &format!("{name}/"), files);
        } else {
            files.insert(name, std::fs::read(&path).unwrap());
        }
    }
}
