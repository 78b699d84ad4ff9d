// llmslim playground: plain JavaScript, no build step, no outside resources.
// Every URL is relative to the page, so the page also works behind a reverse proxy at a sub-path.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const BASE = new URL(".", location.href);
  const KEY_STORE = "llmslim-api-key";
  const el = {
    settings: $("settings"), system: $("system"), temperature: $("temperature"), topP: $("top-p"),
    maxTokens: $("max-tokens"), key: $("api-key"), keyStatus: $("key-status"), facts: $("facts-list"),
    recipeBox: $("recipe-box"), recipe: $("recipe"), modelName: $("model-name"), log: $("log"),
    composer: $("composer"), prompt: $("prompt"), promptLabel: $("prompt-label"), send: $("send"),
    stop: $("stop"), clear: $("clear"), status: $("status"),
  };
  let facts = null; // GET v1/llmslim/info
  let history = []; // the chat so far: [{role, content}], sent again with every turn
  let current = null; // the answer being generated: {controller}

  const url = (path) => new URL(path, BASE).toString();
  const apiKey = () => el.key.value.trim();
  const mode = () => document.querySelector('input[name="mode"]:checked').value;
  const mib = (b) => (b == null ? "–" : `${(b / 2 ** 20).toFixed(1)} MiB`);
  const pct = (x) => `${(100 * x).toFixed(1)}%`;

  function headers(json) {
    const h = json ? { "Content-Type": "application/json" } : {};
    const k = apiKey();
    if (k) h.Authorization = `Bearer ${k}`;
    return h;
  }

  function say(text) {
    el.status.textContent = text;
  }

  async function errorText(res) {
    let message = `${res.status} ${res.statusText}`;
    let code = null;
    try {
      const body = await res.json();
      if (body && body.error && body.error.message) message = body.error.message;
      if (body && body.error) code = body.error.code;
    } catch (_) { /* not JSON */ }
    if (code === "context_length_exceeded") message += " Start a new conversation, or lower Max tokens.";
    if (res.status === 401) {
      return apiKey()
        ? "The server refused this API key (401). Check the key in the API key field."
        : "This server requires an API key (401). Enter it in the API key field.";
    }
    return `Error ${res.status}: ${message}`;
  }

  function needKey(text) {
    el.keyStatus.textContent = text;
    el.keyStatus.className = "note error";
    el.key.setAttribute("aria-invalid", "true");
    el.key.focus();
  }

  function keyAccepted() {
    el.key.removeAttribute("aria-invalid");
    if (el.keyStatus.classList.contains("error")) {
      el.keyStatus.textContent = apiKey() ? "Key accepted." : "";
      el.keyStatus.className = "note ok";
    }
  }

  // ---- model facts ---------------------------------------------------------------------------

  function describeQuant(qc) {
    if (!qc) return `none (${(facts && facts.dtype) || "float"} weights)`;
    if (typeof qc !== "object") return String(qc);
    const method = qc.quant_method || qc.method || "unknown";
    if (method === "gptq") {
      const parts = [`GPTQ ${qc.bits}-bit`];
      if (qc.group_size != null) parts.push(qc.group_size === -1 ? "per-channel" : `group ${qc.group_size}`);
      parts.push(qc.sym === false ? "asym" : "sym");
      if (qc.desc_act) parts.push("act-order");
      const overrides = qc.dynamic ? Object.keys(qc.dynamic).length : 0;
      if (overrides) parts.push(`${overrides} per-module override${overrides > 1 ? "s" : ""}`);
      return parts.join(", ");
    }
    if (method === "bitsandbytes") {
      if (qc.load_in_4bit) {
        return `bitsandbytes ${qc.bnb_4bit_quant_type || "4-bit"}${qc.bnb_4bit_use_double_quant ? " + double quant" : ""}`;
      }
      if (qc.load_in_8bit) return "bitsandbytes LLM.int8";
    }
    return method;
  }

  function describePruning(entries) {
    if (!entries || !entries.length) return "none";
    return entries.map((e) => {
      let text = e.method || "pruned";
      if (e.nm) text += ` ${e.nm}`;
      else if (e.sparsity) text += ` ${pct(e.sparsity)}`;
      if (e.drop_blocks) text += ` −${e.drop_blocks} blocks`;
      if (e.sparsity_measured != null) text += `, measured sparsity ${pct(e.sparsity_measured)}`;
      if (Array.isArray(e.parameters)) {
        text += `, parameters ${e.parameters[0].toLocaleString("en")} → ${e.parameters[1].toLocaleString("en")}`;
      }
      return text;
    }).join("; ");
  }

  function renderFacts(f) {
    const rows = [
      ["model", f.id, "id"],
      ["architecture", f.model_type ? `${f.architecture} (${f.model_type})` : f.architecture, "architecture"],
      ["quantization", describeQuant(f.quantization_config), "quantization"],
      ["pruning", describePruning(f.pruning), "pruning"],
      ["size on disk", mib(f.size_on_disk_bytes), "size_on_disk_bytes"],
      ["weights in memory", mib(f.memory_bytes), "memory_bytes"],
      ["server RSS", `${mib(f.rss_bytes)} (peak ${mib(f.peak_rss_bytes)})`, "rss_bytes"],
      ["context", `${f.max_model_len} tokens`, "max_model_len"],
      ["batch", `up to ${f.max_batch} sequences`, "max_batch"],
    ];
    if (f.made_from) rows.push(["made from", f.made_from, "made_from"]);
    rows.push(["llmslim", f.llmslim_version, "llmslim_version"]);
    el.facts.replaceChildren();
    for (const [name, value, key] of rows) {
      const dt = document.createElement("dt");
      dt.textContent = name;
      const dd = document.createElement("dd");
      dd.textContent = value == null ? "–" : String(value);
      dd.dataset.fact = key;
      el.facts.append(dt, dd);
    }
    if (f.quantization_config && typeof f.quantization_config === "object") {
      el.facts.querySelector('[data-fact="quantization"]').title = JSON.stringify(f.quantization_config, null, 1);
    }
    el.recipeBox.hidden = !f.recipe;
    el.recipe.textContent = f.recipe || "";
    el.modelName.textContent = `${f.id} · ${describeQuant(f.quantization_config)}`;
  }

  async function loadFacts(quiet) {
    let res;
    try {
      res = await fetch(url("v1/llmslim/info"), { headers: headers(false), cache: "no-store" });
    } catch (e) {
      if (!quiet) showFactsError(`cannot reach the server (${e.message})`);
      return false;
    }
    if (!res.ok) {
      const text = await errorText(res);
      showFactsError(res.status === 401 ? "locked: needs the API key" : text);
      if (res.status === 401 && !quiet) needKey(text);
      return false;
    }
    const firstTime = facts === null;
    facts = await res.json();
    renderFacts(facts);
    if (firstTime && facts.max_model_len) { // a default that fits the model's context
      el.maxTokens.max = String(facts.max_model_len);
      if (Number(el.maxTokens.value) > facts.max_model_len / 2) {
        el.maxTokens.value = String(Math.floor(facts.max_model_len / 2));
      }
    }
    keyAccepted();
    return true;
  }

  function showFactsError(text) {
    const dt = document.createElement("dt");
    dt.textContent = "status";
    const dd = document.createElement("dd");
    dd.textContent = text;
    dd.dataset.fact = "status";
    el.facts.replaceChildren(dt, dd);
    el.modelName.textContent = text;
  }

  // ---- the conversation ----------------------------------------------------------------------

  function addEntry(kind, text) {
    const node = document.createElement("article");
    node.className = `msg ${kind}`;
    const who = document.createElement("h3");
    who.className = "who";
    who.textContent = { user: "You", assistant: "Model", completion: "Completion" }[kind];
    const body = document.createElement("div");
    body.className = "text";
    if (kind === "completion") {
      const prompt = document.createElement("span");
      prompt.className = "prompt-echo";
      prompt.textContent = text;
      body.append(prompt);
    } else if (text) {
      body.textContent = text;
    }
    const out = document.createElement("span");
    out.className = "out";
    body.append(out);
    const stats = document.createElement("p");
    stats.className = "stats";
    node.append(who, body, stats);
    el.log.append(node);
    el.log.scrollTop = el.log.scrollHeight;
    return { node, out, stats };
  }

  function readParams() {
    for (const input of [el.temperature, el.topP, el.maxTokens]) {
      if (!input.checkValidity() || input.value === "") {
        say(`${input.labels[0].textContent}: ${input.validationMessage || "enter a number"}`);
        input.focus();
        return null;
      }
    }
    return {
      temperature: Number(el.temperature.value),
      top_p: Number(el.topP.value),
      max_tokens: Math.round(Number(el.maxTokens.value)),
    };
  }

  function setBusy(busy) {
    el.send.disabled = busy;
    el.stop.disabled = !busy;
    document.body.classList.toggle("busy", busy);
  }

  async function send() {
    if (current) return;
    const text = el.prompt.value;
    if (!text.trim()) {
      say("Type a message first.");
      el.prompt.focus();
      return;
    }
    const params = readParams();
    if (!params) return;
    const chat = mode() === "chat";
    const body = { ...params, stream: true, stream_options: { include_usage: true } };
    if (facts) body.model = facts.id;
    let entry;
    let messages = null;
    if (chat) {
      messages = [];
      const system = el.system.value.trim();
      if (system) messages.push({ role: "system", content: system });
      messages.push(...history, { role: "user", content: text });
      body.messages = messages;
      addEntry("user", text);
      entry = addEntry("assistant", "");
      el.prompt.value = "";
    } else {
      body.prompt = text;
      entry = addEntry("completion", text);
    }
    const controller = new AbortController();
    current = { controller };
    setBusy(true);
    say("Generating…");
    entry.node.classList.add("streaming");
    entry.node.setAttribute("aria-busy", "true");

    const t0 = performance.now();
    let first = null;
    let last = null;
    let pieces = 0;
    let usage = null;
    let finish = null;
    let error = null;
    let stopped = false;
    let answer = "";
    try {
      const res = await fetch(url(chat ? "v1/chat/completions" : "v1/completions"), {
        method: "POST", headers: headers(true), body: JSON.stringify(body), signal: controller.signal,
      });
      if (!res.ok) {
        error = await errorText(res);
        if (res.status === 401) needKey(error);
      } else {
        const reader = res.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "";
        read: for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const event = buffer.slice(0, cut);
            buffer = buffer.slice(cut + 2);
            for (const line of event.split("\n")) {
              if (!line.startsWith("data:")) continue;
              const data = line.slice(5).trim();
              if (data === "[DONE]") break read;
              const chunk = JSON.parse(data);
              if (chunk.error) {
                error = `Error: ${chunk.error.message}`;
                continue;
              }
              if (chunk.usage) usage = chunk.usage;
              for (const choice of chunk.choices || []) {
                const piece = chat ? (choice.delta && choice.delta.content) || "" : choice.text || "";
                if (piece) {
                  const now = performance.now();
                  if (first === null) first = now;
                  last = now;
                  pieces += 1;
                  answer += piece;
                  entry.out.append(piece);
                  entry.node.dataset.pieces = String(pieces);
                  el.log.scrollTop = el.log.scrollHeight;
                }
                if (choice.finish_reason) finish = choice.finish_reason;
              }
            }
          }
        }
      }
    } catch (e) {
      if (e.name === "AbortError") stopped = true;
      else error = `The request failed: ${e.message}`;
    }
    const end = performance.now();
    entry.node.classList.remove("streaming");
    entry.node.removeAttribute("aria-busy");

    const tokens = usage ? usage.completion_tokens : pieces;
    const parts = [];
    if (stopped) parts.push("stopped");
    if (first !== null) {
      parts.push(`${usage ? "" : "≈"}${tokens} token${tokens === 1 ? "" : "s"}`);
      if (tokens > 1 && last > first) parts.push(`${((tokens - 1) / ((last - first) / 1000)).toFixed(1)} tok/s`);
      parts.push(`first token ${((first - t0) / 1000).toFixed(2)} s`);
    }
    if (usage) parts.push(`prompt ${usage.prompt_tokens} tokens`);
    if (finish) parts.push(`finish: ${finish}`);
    parts.push(`${((end - t0) / 1000).toFixed(1)} s total`);
    if (!(error && first === null)) entry.stats.textContent = parts.join(" · ");
    entry.node.dataset.tokens = String(tokens);
    if (usage) entry.node.dataset.promptTokens = String(usage.prompt_tokens);
    entry.node.dataset.state = error ? "error" : stopped ? "stopped" : "done";

    if (error) {
      const p = document.createElement("p");
      p.className = "error";
      p.setAttribute("role", "alert");
      p.textContent = error;
      entry.node.append(p);
      say(error);
      if (chat && !answer) el.prompt.value = text; // nothing came back: let the user send it again
    } else {
      say(stopped ? `Stopped after ${tokens} tokens.` : `Done: ${parts.join(", ")}.`);
    }
    if (chat && answer) history.push({ role: "user", content: text }, { role: "assistant", content: answer });
    current = null;
    setBusy(false);
    if (!document.activeElement || document.activeElement === document.body || document.activeElement === el.stop) {
      el.prompt.focus();
    }
    if (!error) loadFacts(true); // the resident memory after this answer
  }

  function stop() {
    if (current) current.controller.abort();
  }

  function setMode() {
    const chat = mode() === "chat";
    el.system.disabled = !chat;
    el.promptLabel.textContent = chat ? "Message" : "Prompt (the model continues it)";
    el.prompt.placeholder = chat
      ? "Ask something… (Enter sends, Shift+Enter for a new line)"
      : "Text for the model to continue… (Enter sends, Shift+Enter for a new line)";
  }

  // ---- wiring --------------------------------------------------------------------------------

  el.composer.addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  el.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.altKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && current) {
      e.preventDefault();
      stop();
    }
  });
  el.stop.addEventListener("click", stop);
  el.clear.addEventListener("click", () => {
    stop();
    history = [];
    el.log.replaceChildren();
    say("New conversation.");
    el.prompt.focus();
  });
  el.settings.addEventListener("submit", async (e) => {
    e.preventDefault();
    if (apiKey()) sessionStorage.setItem(KEY_STORE, apiKey());
    else sessionStorage.removeItem(KEY_STORE);
    el.keyStatus.textContent = "Checking…";
    el.keyStatus.className = "note";
    if (await loadFacts(false)) {
      el.keyStatus.textContent = apiKey() ? "Key accepted." : "No key needed.";
      el.keyStatus.className = "note ok";
    }
  });
  for (const radio of document.querySelectorAll('input[name="mode"]')) radio.addEventListener("change", setMode);

  el.key.value = sessionStorage.getItem(KEY_STORE) || "";
  setMode();
  setBusy(false);
  loadFacts(false);
})();
