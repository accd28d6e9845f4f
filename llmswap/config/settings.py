"""Every configuration setting, declared once: its type, default, unit and help text.

The sections here are what :mod:`llmswap.config` reads and what the README's table of settings
(``python -m llmswap settings``) shows; :mod:`.schema` says how a declaration is read.
"""

from __future__ import annotations

from collections.abc import Iterator

from llmswap.config.schema import Section, Setting

# The scheduling policies a configuration may name; llmswap.swap.policy implements them.
FIFO = "fifo"
SWAP_AWARE = "swap-aware"
POLICIES = (SWAP_AWARE, FIFO)
# What may measure a device (llmswap.memory.witness makes them): host memory, or an NVIDIA
# GPU by its NVML index (``nvml:0``).
PROBES = ("ram", "nvml:<index>")

DEFAULT_LISTEN = "tcp:8888"

# fmt: off
GLOBAL = Section("", (
    Setting("models", "section", None, "the models, by name (see `models.<name>.*`)"),
    Setting("listen", "text", DEFAULT_LISTEN, "strports endpoint (`--listen` overrides)",
      what="a strports endpoint like tcp:8888"),
    Setting("queue_size", "number", 50, "requests that may wait; more get 503", unit="requests",
      integer=True),
    Setting("request_timeout", "number", 600.0,
      "seconds a request may wait for its backend (queue + "
      "swap), and seconds of silence tolerated from a backend while relaying", unit="s"),
    Setting("health_interval", "number", 0.01,
      "seconds between readiness polls while loading; "
      "a line the backend prints is a poll at once, and one whose last readiness came with a "
      "line (or whose first load this is) is polled between its lines every 0.1 s (or this, "
      "if longer)", unit="s"),
    Setting("max_body_bytes", "number", 16 * 1024 * 1024, "larger JSON request bodies get 413",
      unit="bytes", integer=True),
    Setting("max_upload_bytes", "size", 2 * 2**30, "larger multipart (audio, image) and "
      "`/upstream/` bodies get 413; they are relayed from a temporary file, not memory",
      shown_default="`2GiB`"),
    Setting("idle_timeout", "number", 60.0,
      "seconds a client connection may stay open with no request "
      "under way (a stream or a waiting request is not idle)", unit="s"),
    Setting("max_connections", "number", 4096,
      "client connections open at once; more are refused at "
      "once (bounded further by the descriptor limit, which llmswap raises to its hard limit)",
      unit="connections", integer=True),
    Setting("pass_env", "list", (),
      "environment variables backends inherit although llmswap reads them "
      "(an API key's `key_env`, a remote model's, `DOCKER_*`): by default they are removed"),
    Setting("log_dir", "text", None, "per-model backend output", what="a directory path",
      shown_default="`$XDG_STATE_HOME/llmswap/logs` or `~/.local/state/llmswap/logs`"),
    Setting("state_dir", "text", None,
      "what llmswap learns across restarts (the measured footprints)", what="a directory path",
      shown_default="`$XDG_STATE_HOME/llmswap` or `~/.local/state/llmswap`"),
    Setting("docker", "section", None, "this machine's Docker engine (see `docker.*`)"),
    Setting("hosts", "section", None,
      "more boxes, each a Docker engine with its own devices, by name "
      "(see `hosts.<name>.*`); this machine is the host `local`"),
    Setting("scheduler", "choice", SWAP_AWARE, "`swap-aware` or `fifo` (see How swapping works)",
      choices=POLICIES),
    Setting("max_wait_before_swap", "number", 60.0, "seconds a request for another model may wait "
      "before the loaded model must give way (per model too)", unit="s"),
    Setting("linger", "number", 2.0,
      "seconds a model that just answered stays preferred (a client's "
      "follow-up request should not find it swapped out); overdue requests do not wait for it",
      unit="s", minimum=-1e-9),
    Setting("linger_bound", "flag", True,
      "a model lingers at most as long as its last load (or wake) "
      "took: waiting for a follow-up is worth at most the reload it saves (ski rental)"),
    Setting("drain_timeout", "number", None, "seconds an evicted model's in-flight requests get to "
      "finish (per model too)", unit="s", shown_default="`request_timeout`"),
    Setting("priority_header", "text", None,
      "request header carrying an integer priority, e.g. `X-Priority`"),
    Setting("keepalive_interval", "number", 5.0,
      "seconds between `: loading ...` comments to a waiting stream", unit="s"),
    Setting("preload", "list", (), "models to load at start-up (they must fit together)"),
    Setting("devices", "section", None,
      "memory budgets by device name (see `devices.<name>.memory`); "
      "none: one model at a time"),
    Setting("auth", "section", None,
      "API keys, see [Access control](#access-control-limits-and-metrics)"),
    Setting("access_log", "flag", True,
      "one log line per request, written in batches at most 10 ms "
      "after the request ends (each line keeps its own time)"),
    Setting("console", "section", None, "the web console at `/ui/` (see `console.*`)"),
    Setting("start_port", "number", 5800,
      "the first port `${PORT}` assigns (each model that uses it "
      "gets its own, kept across reloads)", integer=True),
    Setting("macros", "section", None, "`${NAME}` substitutions for `cmd`, URLs, `env`... (values: "
      "strings, numbers, booleans; `${env.NAME}` reads the environment)"),
    Setting("list_aliases", "flag", False, "`/v1/models` lists each alias too"),
    Setting("loading_status", "choice", "comments",
      "what a streamed chat gets while its model loads: "
      "`comments` (SSE comments, invisible) or `reasoning` (`reasoning_content` deltas that chat "
      "clients show as thinking: model, seconds waited, its usual load time)",
      choices=("comments", "reasoning")),
    Setting("pools", "section", None,
      "virtual model names served by whichever of their models suits (see `pools.<name>.*`)"),
    Setting("include", "paths", None,
      "more files whose `models`, `pools` and `macros` join this file's: paths or globs "
      "(`models.d/*.yaml`), relative to this file", shown_default="none"),
    Setting("watch_config", "flag", False,
      "reload when the file (or an included one) changes, as SIGHUP does; an invalid file "
      "is refused and the running configuration kept"),
    Setting("prefetch_reserve", "size", 2 * 2**30,
      "memory prefetching leaves free (beyond what the "
      "loaded models' weight files hold in the page cache)", shown_default="`2GiB`"),
))

CONSOLE = Section("console", (
    Setting("open", "flag", False,
      "without `auth`, let clients beyond loopback use the console, the "
      "logs and the `/admin/` routes (with `auth` they need an admin key)"),
    Setting("hosts", "list", (),
      "without `auth`: host names (the `Host` header) the console and the "
      "`/admin/` routes answer to besides loopback names and IP addresses (a DNS-rebinding page "
      "comes with a name of its own)"),
    Setting("unix_is_loopback", "flag", False,
      "clients on a `unix:` listening socket count as loopback "
      "(leave off when a reverse proxy on the socket serves the LAN)"),
    Setting("activity", "number", 1000, "finished requests the Activity view keeps in memory",
      unit="requests", integer=True),
    Setting("history", "text", None, "SQLite file that keeps the activity across restarts",
      what="a file path"),
    Setting("history_days", "number", 7.0, "days of activity the history file keeps", unit="days"),
    Setting("log_lines", "number", 1000, "lines of llmswap's own log (and of each backend's, when "
      "asked) the Logs view gets", unit="lines", integer=True),
    Setting("failures", "number", 50, "failed or cut requests the console keeps with their "
      "details (request body, backend answer and output: users' prompts); in `history` too when "
      "it is set; `0` keeps none", unit="requests", integer=True, minimum=-1),
    Setting("edit_config", "choice", "auth", "the console's Config view may check, write and "
      "apply the configuration file (which says what commands run): `auth` with an admin key "
      "only, so never without `auth`; `true` also without `auth`, to whoever may use the console; "
      "`false` never (it only shows the running configuration)", choices=("auth", "true", "false")),
))

DOCKER = Section("docker", (
    Setting("base_url", "text", None, "Docker engine URL (`unix://`, `tcp://`, `ssh://`)",
      shown_default="`DOCKER_HOST` or local socket"),
    Setting("timeout", "number", 60.0, "seconds per Docker API call", unit="s"),
    Setting("stop_on_exit", "flag", False,
      "stop the loaded container when llmswap stops (otherwise "
      "it is left running and adopted at the next start)"),
    Setting("tls", "section", None, "client certificates for a `tcp://` engine started with "
      "`--tlsverify` (see `docker.tls.*`)"),
    Setting("insecure", "flag", False,
      "allow plain `tcp://` to an engine beyond loopback (that socket "
      "is root on its box: anyone who reaches it owns the box)"),
))

DOCKER_TLS = Section("docker.tls", (
    Setting("ca", "text", None, "the CA that signed the engine's certificate (PEM file)",
      what="a file path"),
    Setting("cert", "text", None, "llmswap's client certificate (PEM file)", what="a file path"),
    Setting("key", "text", None, "its private key (PEM file)", what="a file path"),
))

HOST = Section("hosts.<name>", (
    Setting("docker", "section", None,
      "its engine, with the keys of `docker.*` (`base_url` required)"),
    Setting("address", "text", "127.0.0.1", "what `${HOST}` is in its models' URLs (its name or IP "
      "as llmswap reaches it)"),
    Setting("devices", "section", None, "its memory budgets, as `devices.<name>.memory`; none: one "
      "model at a time on it"),
))

DEVICE = Section("devices.<name>", (
    Setting("memory", "size", None,
      "a device's memory budget (`24GiB`, `16000MiB`, `16GB`; a bare number is GiB)"),
    Setting("probe", "text", None,
      "what measures the device: `ram` (host memory) or `nvml:<index>` (an NVIDIA GPU, with the "
      "`nvml` extra); models' footprints are then measured and a start waits until the device "
      "really has room", what="`ram` or `nvml:<index>`"),
    Setting("free_timeout", "number", 30.0,
      "seconds a start waits, after an eviction, for a probed device to show the memory free",
      unit="s"),
))

MODEL = Section("models.<name>", (
    Setting("backend_url", "url", None, "the backend's OpenAI base URL, ending in `/v1` (required "
      "unless `cmd` uses `${PORT}`)", shown_default="`http://127.0.0.1:${PORT}/v1`"),
    Setting("health_url", "url", None, "polled until 2xx",
      shown_default="`backend_url` without `/v1` + `/health`"),
    Setting("startup_timeout", "number", 180.0, "seconds to become healthy", unit="s"),
    Setting("stop_timeout", "number", 10.0, "seconds between SIGTERM and SIGKILL (a "
      "second SIGTERM comes at three times its longest recent stop, at least 1 s, or at half of "
      "this)",
      unit="s"),
    Setting("container_name", "text", None,
      "a pre-created Docker container to start/stop (exactly one of this, `cmd` and `remote`)"),
    Setting("remote", "section", None,
      "an always-on OpenAI-compatible endpoint llmswap does not start "
      "or stop (see `models.<name>.remote.*`)"),
    Setting("cmd", "command", None,
      "argv list or shell-like string of a local process (no shell involved)"),
    Setting("env", "env", None, "environment additions for `cmd`"),
    Setting("cwd", "text", None, "working directory for `cmd`"),
    Setting("concurrency", "number", 1, "requests run at once on this model", unit="requests",
      integer=True),
    Setting("ttl", "number", None, "unload after this many idle seconds", unit="s"),
    Setting("max_wait_before_swap", "number", None, "as the global key", unit="s",
      shown_default="global value"),
    Setting("drain_timeout", "number", None, "as the global key", unit="s",
      shown_default="global value"),
    Setting("host", "text", None, "the host it runs on (a name from `hosts`)",
      shown_default="`local`, this machine"),
    Setting("hosts", "list", None, "the hosts it may run on (the same container on each): it is "
      "served where it is loaded, else loaded where it evicts least"),
    Setting("device", "text", None, "the device it loads on (required with several devices)",
      shown_default="the only device"),
    Setting("memory", "size", None,
      "footprint for the memory budget; `auto`: estimated from a llama-server `cmd`'s GGUF "
      "(the `gguf` extra)", shown_default="whole device"),
    Setting("info", "section", None,
      "what Ollama clients are told of it (see `models.<name>.info.*`)"),
    Setting("sleep", "section", None,
      "unloading puts it to sleep instead of stopping it, and loading "
      "wakes it (see `models.<name>.sleep.*`)"),
    Setting("files", "paths", None,
      "its weight files (host paths, e.g. a container's bind mounts), "
      "read ahead while it waits to be loaded", shown_default="`cmd`'s `-m`/`--model` file "
      "and its split parts"),
    Setting("prefetch", "flag", True, "read its weight files into the page cache while a request "
      "waits for it and another model still serves"),
    Setting("macros", "section", None,
      "macros of this model only (over the global ones); `${MODEL_ID}` "
      "is its name, `${PORT}` its port"),
    Setting("aliases", "list", (), "other names requests may use for it (one backend, one queue)"),
    Setting("unlisted", "flag", False, "served, but not listed by `/v1/models` (nor its aliases)"),
    Setting("use_model_name", "text", None,
      "the `model` sent to the backend instead of the name asked "
      "for (vLLM serves one name)"),
    Setting("strip_params", "list", (), "request fields removed before the backend sees them"),
    Setting("set_params", "section", None, "request fields forced to these values (sampling "
      "defaults, a context cap...)"),
    Setting("loading_status", "choice", None,
      "as the global key", choices=("comments", "reasoning"),
      shown_default="global value"),
))

REMOTE = Section("models.<name>.remote", (
    Setting("url", "url", None, "its OpenAI base URL, e.g. `https://box2.lan:8888/v1` (required)"),
    Setting("key_env", "text", None,
      "environment variable with its API key, sent as `Authorization: "
      "Bearer` instead of the client's"),
    Setting("upstream", "flag", False,
      "`/upstream/` may reach it (its inference routes only, with its "
      "key)"),
))

SLEEP = Section("models.<name>.sleep", (
    Setting("kind", "choice", None, "`vllm` (`--enable-sleep-mode`, `VLLM_SERVER_DEV_MODE=1`), "
      "`sglang` (`--enable-memory-saver`) or `http` (the three URLs below; required)",
      choices=("vllm", "sglang", "http")),
    Setting("level", "number", 1, "vLLM's sleep level: 1 keeps the weights in host memory, 2 "
      "discards them", integer=True),
    Setting("sleep_url", "url", None,
      "`http`: POSTed to put it to sleep", shown_default="by `kind`"),
    Setting("wake_url", "url", None, "`http`: POSTed to wake it", shown_default="by `kind`"),
    Setting("status_url", "url", None,
      "polled until its JSON says `is_sleeping` true (after a sleep) "
      "or false (after a wake); none: the POST's 2xx is the confirmation",
      shown_default="by `kind`"),
    Setting("memory", "size", None, "host memory it holds while asleep, counted on `sleep.device`",
      shown_default="not counted"),
    Setting("device", "text", None, "the device whose budget counts `sleep.memory`",
      shown_default="`ram`"),
    Setting("timeout", "number", 60.0, "seconds a sleep may take before it is stopped instead",
      unit="s"),
))

INFO = Section("models.<name>.info", (
    Setting("capabilities", "list", ("completion",),
      "`completion`, `tools`, `vision`, `embedding`, "
      "`thinking`: what `/api/show` reports (and `insert` with `suffix` support)"),
    Setting("context_length", "number", None,
      "context length in tokens (else llama-server's `/props` "
      "tells it while loaded)", unit="tokens", integer=True),
    Setting("family", "text", None, "model family, e.g. `gemma3`"),
    Setting("parameter_size", "text", None, "e.g. `270M`, `8B`"),
    Setting("quantization_level", "text", None, "e.g. `Q4_K_M`"),
))

POOL = Section("pools.<name>", (
    Setting("models", "list", None, "its models (or aliases), in order of preference (required)"),
    Setting("prefer", "choice", "loaded",
      "`loaded`: a member already loaded (or loading), else the first that fits beside what "
      "is loaded, else the first; `order`: the first member, passing over one held back by "
      "crash backoff", choices=("loaded", "order")),
    Setting("unlisted", "flag", False, "served, but not listed by `/v1/models`"),
))

AUTH = Section("auth", (
    Setting("keys", "list", None, "the API keys (see `auth.keys[].*`)"),
    Setting("open_health", "choice", "true",
      "`/health` and `/metrics` answer without a key: `true` "
      "(states and counts), `full` (backend details too: pids, paths, URLs, output lines) or "
      "`false` (a key needed; details need an admin key)", choices=("true", "false", "full")),
))

KEY = Section("auth.keys[]", (
    Setting("name", "text", None, "what logs and metrics show instead of the key (required)"),
    Setting("key", "text", None, "the key itself (exactly one of `key`, `key_env`, `key_file`)"),
    Setting("key_env", "text", None, "environment variable holding the key"),
    Setting("key_file", "text", None, "file holding the key"),
    Setting("models", "list", None, "the models this key may use (and sees in `/v1/models`)",
      shown_default="all"),
    Setting("priority", "number", 0, "scheduling priority of its requests (higher first)",
      integer=True, minimum=float("-inf")),
    Setting("rpm", "number", None, "requests per minute (burst up to rpm)", unit="requests",
      integer=True),
    Setting("max_concurrent", "number", None, "requests queued + running at once", unit="requests",
      integer=True),
    Setting("admin", "flag", False, "may call `/admin/...`, the console and `/upstream/`"),
    Setting("unload", "flag", False,
      "may unload models (`/admin/unload`, Ollama's `keep_alive: 0`)"),
    Setting("upstream", "flag", False,
      "may use `/upstream/` (never a backend's management routes)"),
))
# fmt: on

SECTIONS = (
    GLOBAL,
    DOCKER,
    DOCKER_TLS,
    HOST,
    CONSOLE,
    DEVICE,
    MODEL,
    INFO,
    SLEEP,
    REMOTE,
    POOL,
    AUTH,
    KEY,
)


def documented() -> Iterator[tuple[str, Setting]]:
    """Every setting with its full path, in the order the docs list them."""
    for section in SECTIONS:
        for s in section.settings:
            yield (f"{section.path}.{s.key}" if section.path else s.key), s


def markdown_table() -> str:
    """The README's table of settings."""
    rows = ["| Key | Default | Unit | Meaning |", "|---|---|---|---|"]
    for path, s in documented():
        rows.append(f"| `{path}` | {s.default_text()} | {s.unit} | {s.help} |")
    return "\n".join(rows)
