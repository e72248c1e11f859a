// The model page's playground: calls the server's own /embed and /tokenize routes (session cookie
// + X-CSRF-Token), so what it shows is exactly what the API returns.
(function () {
  "use strict";
  const root = document.getElementById("playground");
  if (!root) return;
  const inputs = document.getElementById("inputs");
  const status = document.getElementById("status");
  const price = parseFloat(root.dataset.price || "0");

  function addInput(text) {
    const row = document.createElement("div");
    row.className = "input-row";
    const area = document.createElement("textarea");
    area.className = "input-text";
    area.value = text || "";
    area.placeholder = "Text to embed";
    const del = document.createElement("button");
    del.type = "button";
    del.className = "remove-input";
    del.textContent = "Remove";
    del.addEventListener("click", () => { if (inputs.children.length > 1) row.remove(); });
    row.append(area, del);
    inputs.append(row);
    return area;
  }

  function texts() {
    return Array.from(inputs.querySelectorAll(".input-text")).map((a) => a.value).filter((t) => t.trim() !== "");
  }

  async function call(path, body) {
    const resp = await fetch(path, {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": root.dataset.csrf },
      body: JSON.stringify(body),
    });
    const data = await resp.json();
    if (!resp.ok) throw new Error((data.error && data.error.message) || resp.statusText);
    return { data, resp };
  }

  function norm(v) { return Math.sqrt(v.reduce((s, x) => s + x * x, 0)); }

  function cell(tr, text, tag) {
    const c = document.createElement(tag || "td");
    c.textContent = text;
    tr.append(c);
    return c;
  }

  async function run() {
    const items = texts();
    if (!items.length) { status.textContent = "Add some text first."; return; }
    const base = { inputs: items, model: root.dataset.model, input_type: document.getElementById("input-type").value };
    const task = document.getElementById("task");
    if (task && task.value.trim()) base.task = task.value.trim();
    const normalize = document.getElementById("normalize").checked;
    status.textContent = "Running...";
    try {
      const tok = await call("/tokenize", base);
      const { data: vectors, resp } = await call("/embed", Object.assign({ normalize }, base));
      const total = parseInt(resp.headers.get("x-e5kit-tokens"), 10);
      const counts = tok.data.data.map((d) => d.tokens.length);
      window.e5kitResult = { vectors, counts, total, normalize };
      show(vectors, counts, total);
      status.textContent = "Done.";
    } catch (e) {
      status.textContent = "Error: " + e.message;
    }
  }

  function show(vectors, counts, total) {
    document.getElementById("output").hidden = false;
    document.getElementById("summary").textContent =
      `${vectors.length} vectors of ${vectors[0].length} dimensions; ${total} tokens; cost $${(total * price / 1e6).toFixed(9)}`;
    const body = document.querySelector("#vectors tbody");
    body.replaceChildren();
    const norms = vectors.map(norm);
    vectors.forEach((v, i) => {
      const tr = document.createElement("tr");
      tr.className = "vector-row";
      cell(tr, String(i + 1));
      cell(tr, String(counts[i]));
      cell(tr, norms[i].toFixed(4)).className = "norm";
      cell(tr, "[" + v.slice(0, 6).map((x) => x.toFixed(4)).join(", ") + ", ...]");
      body.append(tr);
    });
    const heat = document.getElementById("heatmap");
    heat.replaceChildren();
    const head = document.createElement("tr");
    cell(head, "", "th");
    vectors.forEach((_, j) => cell(head, String(j + 1), "th"));
    heat.append(head);
    vectors.forEach((a, i) => {
      const tr = document.createElement("tr");
      cell(tr, String(i + 1), "th");
      vectors.forEach((b, j) => {
        const cos = a.reduce((s, x, k) => s + x * b[k], 0) / (norms[i] * norms[j] || 1);
        const c = cell(tr, cos.toFixed(3));
        c.className = "heat";
        c.dataset.value = String(cos);
        // E5 cosines cluster in 0.7-1.0, so the colour scale spans 0.5-1.0
        const t = Math.max(0, Math.min(1, (cos - 0.5) / 0.5));
        c.style.backgroundColor = `rgb(${Math.round(255 - 180 * t)}, ${Math.round(255 - 120 * t)}, 255)`;
      });
      heat.append(tr);
    });
  }

  document.getElementById("add-input").addEventListener("click", () => addInput("").focus());
  document.getElementById("run").addEventListener("click", run);
  addInput("query: how much protein should a female eat");
  addInput("query: summit define");
})();
