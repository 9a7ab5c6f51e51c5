// Feature dashboard (dictionary_learning): the index table and the per-latent page.
// Data comes from script files next to the pages (data/*.js), so the pages work from file://
// without a server. Every text from the data is inserted with textContent, never as HTML.
"use strict";

var DL = window.DL = window.DL || {};
DL.chunks = DL.chunks || {};
DL.chunk = function (index, latents) { DL.chunks[index] = latents; };

// ------------------------------------------------------------------ helpers
function el(tag, attrs, children) {
  var node = document.createElement(tag);
  if (attrs) Object.keys(attrs).forEach(function (key) {
    if (key === "text") node.textContent = attrs[key];
    else if (key === "className") node.className = attrs[key];
    else node.setAttribute(key, attrs[key]);
  });
  (children || []).forEach(function (child) { if (child) node.appendChild(child); });
  return node;
}

function svgEl(tag, attrs) {
  var node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  Object.keys(attrs || {}).forEach(function (key) { node.setAttribute(key, attrs[key]); });
  return node;
}

function fmt(x) {
  if (x === 0) return "0";
  var a = Math.abs(x);
  if (a >= 1e4 || a < 1e-3) return x.toExponential(2);
  return x.toPrecision(3).replace(/\.?0+$/, function (m) { return m.indexOf(".") >= 0 || m === "" ? "" : m; });
}

// A token's text as shown: newlines and tabs made visible; spaces kept, or shown as middle dots
// (`dots`, for tokens standing alone).
function tokenText(id, dots) {
  if (id < 0) return "";
  var text = DL.vocab[id];
  if (text === undefined) text = "<" + id + ">";
  text = text.replace(/\n/g, "\u21B5").replace(/\t/g, "\u21E5").replace(/\r/g, "\u240D");
  return dots ? text.replace(/ /g, "\u00B7") : text;
}

function chips(ids) {
  var span = el("span");
  (ids || []).forEach(function (id) { span.appendChild(el("span", {className: "tok chip", text: tokenText(id, true)})); });
  return span;
}

function chunkOf(latent) { return Math.floor(latent / DL.meta.chunk_size); }

function loadChunk(index, done, fail) {
  if (DL.chunks[index]) { done(DL.chunks[index]); return; }
  var name = "data/latents/" + String(index).padStart(5, "0") + ".js";
  var script = el("script", {src: name});
  script.onload = function () {
    if (DL.chunks[index]) done(DL.chunks[index]); else fail(name + " did not define chunk " + index);
  };
  script.onerror = function () { fail("could not load " + name); };
  document.head.appendChild(script);
}

// ------------------------------------------------------------------ index page
DL.indexPage = function () {
  var t0 = performance.now();
  var ix = DL.index, n = DL.meta.n_latents;
  var columns = [
    {key: "latent", title: "latent", get: function (i) { return i; }},
    {key: "density", title: "density", get: function (i) { return ix.density[i]; }},
    {key: "log10", title: "log\u2081\u2080 density", get: function (i) { return ix.density[i] > 0 ? Math.log10(ix.density[i]) : -Infinity; }},
    {key: "mean", title: "mean active", get: function (i) { return ix.mean[i]; }},
    {key: "max", title: "max", get: function (i) { return ix.max[i]; }},
    {key: "top", title: "top activating tokens", text: true},
    {key: "promoted", title: "top promoted logits", text: true},
  ];
  var state = {sort: "latent", desc: false, page: 0, pageSize: 100, rows: []};
  var table = document.getElementById("latents");
  var head = el("tr");
  columns.forEach(function (column) {
    var th = el("th", {text: column.title, "data-key": column.key});
    if (!column.text) th.addEventListener("click", function () {
      state.desc = state.sort === column.key ? !state.desc : column.key !== "latent";
      state.sort = column.key; state.page = 0; update();
    });
    head.appendChild(th);
  });
  table.appendChild(el("thead", null, [head]));
  var body = el("tbody");
  table.appendChild(body);

  var tokenStrings = {};  // latent -> lower-case text of its top and promoted tokens, for the filter
  function searchText(i) {
    if (!(i in tokenStrings)) {
      tokenStrings[i] = (ix.top[i] || []).concat(ix.promoted ? ix.promoted[i] || [] : [])
        .map(function (id) { return (DL.vocab[id] || "").toLowerCase(); }).join("\u0000");
    }
    return tokenStrings[i];
  }

  var controls = {
    text: document.getElementById("filter-text"), lo: document.getElementById("filter-lo"),
    hi: document.getElementById("filter-hi"), dead: document.getElementById("filter-dead"),
    size: document.getElementById("page-size"),
  };

  function filtered() {
    var text = controls.text.value.toLowerCase(), rows = [];
    var lo = controls.lo.value === "" ? -Infinity : parseFloat(controls.lo.value);
    var hi = controls.hi.value === "" ? Infinity : parseFloat(controls.hi.value);
    var hideDead = controls.dead.checked;
    for (var i = 0; i < n; i++) {
      var d = ix.density[i];
      if (d === 0) { if (hideDead || controls.lo.value !== "") continue; }
      else { var l = Math.log10(d); if (l < lo || l >= hi) continue; }
      if (text && searchText(i).indexOf(text) < 0) continue;
      rows.push(i);
    }
    var column = columns.filter(function (c) { return c.key === state.sort; })[0];
    var key = new Float64Array(n);
    rows.forEach(function (i) { key[i] = column.get(i); });
    var sign = state.desc ? -1 : 1;
    rows.sort(function (a, b) { return key[a] === key[b] ? a - b : (key[a] < key[b] ? -sign : sign); });
    return rows;
  }

  function render() {
    var rows = state.rows, size = state.pageSize;
    var pages = Math.max(1, Math.ceil(rows.length / size));
    state.page = Math.min(state.page, pages - 1);
    var start = state.page * size, stop = Math.min(rows.length, start + size);
    body.textContent = "";
    for (var r = start; r < stop; r++) {
      var i = rows[r], d = ix.density[i];
      body.appendChild(el("tr", {"data-latent": i}, [
        el("td", null, [el("a", {href: "latent.html#" + i, text: String(i)})]),
        el("td", {className: "num", text: fmt(d)}),
        el("td", {className: "num", text: d > 0 ? Math.log10(d).toFixed(2) : "dead"}),
        el("td", {className: "num", text: fmt(ix.mean[i])}),
        el("td", {className: "num", text: fmt(ix.max[i])}),
        el("td", {className: "toks"}, [chips(ix.top[i])]),
        el("td", {className: "toks"}, [chips(ix.promoted ? ix.promoted[i] : [])]),
      ]));
    }
    table.querySelectorAll("th").forEach(function (th) {
      th.className = th.getAttribute("data-key") === state.sort ? (state.desc ? "sorted-desc" : "sorted-asc") : "";
    });
    document.getElementById("page-info").textContent = rows.length === 0 ? "no latent matches" :
      "latents " + (start + 1) + "\u2013" + stop + " of " + rows.length + " (page " + (state.page + 1) + " of " + pages + ")";
  }

  function update() { state.rows = filtered(); render(); }

  [controls.text, controls.lo, controls.hi].forEach(function (input) {
    input.addEventListener("input", function () { state.page = 0; update(); });
  });
  controls.dead.addEventListener("change", function () { state.page = 0; update(); });
  controls.size.addEventListener("change", function () { state.pageSize = parseInt(controls.size.value, 10); state.page = 0; render(); });
  document.getElementById("prev-page").addEventListener("click", function () { state.page = Math.max(0, state.page - 1); render(); });
  document.getElementById("next-page").addEventListener("click", function () { state.page += 1; render(); });
  document.getElementById("clear-filter").addEventListener("click", function () {
    controls.text.value = controls.lo.value = controls.hi.value = ""; controls.dead.checked = false; state.page = 0; update();
  });
  // a bar of the density histogram filters the table to its range
  document.querySelectorAll("#density-histogram .bar").forEach(function (bar) {
    bar.addEventListener("click", function () {
      if (bar.classList.contains("dead")) { controls.lo.value = controls.hi.value = ""; controls.dead.checked = false; }
      else { controls.lo.value = bar.getAttribute("data-lo"); controls.hi.value = bar.getAttribute("data-hi"); }
      state.sort = "density"; state.desc = true; state.page = 0; update();
      if (bar.classList.contains("dead")) {
        state.rows = state.rows.filter(function (i) { return ix.density[i] === 0; }); render();
      }
    });
  });
  update();
  document.body.setAttribute("data-ready", "1");
  document.getElementById("render-time").textContent = "table built in " + (performance.now() - t0).toFixed(0) + " ms";
};

// ------------------------------------------------------------------ latent page
function histogramSvg(counts, scale, max) {
  var w = 360, h = 130, left = 8, bottom = 22, top = 8;
  var used = counts.length;  // show bins up to the one holding the maximum
  if (max > 0) used = Math.min(counts.length, Math.floor(max / scale * counts.length) + 1);
  var peak = Math.max.apply(null, counts.slice(0, used).concat([1]));
  var svg = svgEl("svg", {width: w, height: h, viewBox: "0 0 " + w + " " + h, role: "img"});
  var bw = (w - 2 * left) / used;
  for (var j = 0; j < used; j++) {
    if (!counts[j]) continue;
    var bh = (h - bottom - top) * counts[j] / peak;
    var rect = svgEl("rect", {"class": "bar", x: left + j * bw + 0.5, y: h - bottom - bh, width: Math.max(bw - 1, 1), height: bh});
    var title = svgEl("title");
    title.textContent = fmt(j * scale / counts.length) + "\u2013" + fmt((j + 1) * scale / counts.length) + ": " + counts[j];
    rect.appendChild(title);
    svg.appendChild(rect);
  }
  svg.appendChild(svgEl("line", {"class": "axis", x1: left, x2: w - left, y1: h - bottom, y2: h - bottom}));
  [[0, "0"], [used, fmt(used * scale / counts.length)]].forEach(function (tick, k) {
    var label = svgEl("text", {x: left + tick[0] * bw, y: h - 6, "text-anchor": k ? "end" : "start"});
    label.textContent = tick[1];
    svg.appendChild(label);
  });
  return svg;
}

// One context: its activation at the centre token, and its tokens shaded by the latent's value.
function contextRow(entry, qscale) {
  var value = entry[0], ids = entry[2], q = entry[3], centre = (ids.length - 1) / 2;
  var text = el("span", {className: "text"});
  ids.forEach(function (id, k) {
    if (id < 0) return;
    var v = k === centre ? value : q[k] * qscale / 1000;
    var alpha = Math.max(0, Math.min(1, q[k] / 1000));
    var span = el("span", {className: "tok" + (k === centre ? " centre" : ""), "data-v": fmt(v),
                           title: JSON.stringify(DL.vocab[id] === undefined ? "<" + id + ">" : DL.vocab[id]) + "  " + fmt(v),
                           text: tokenText(id)});
    if (alpha > 0) span.style.backgroundColor = "rgba(255,110,0," + (0.08 + 0.82 * alpha).toFixed(3) + ")";
    text.appendChild(span);
  });
  return el("div", {className: "ctx", "data-token": entry[1]}, [el("span", {className: "val", text: fmt(value)}), text]);
}

function logitTable(pairs, cls) {
  var table = el("table", {className: "logits"});
  pairs.forEach(function (pair) {
    table.appendChild(el("tr", null, [el("td", null, [el("span", {className: "tok chip", text: tokenText(pair[0], true)})]),
                                      el("td", {className: "v " + cls, text: (pair[1] > 0 ? "+" : "") + fmt(pair[1])})]));
  });
  return table;
}

DL.latentPage = function () {
  var main = document.getElementById("latent");
  function show() {
    var t0 = performance.now();
    var i = parseInt(location.hash.slice(1), 10);
    if (!(i >= 0 && i < DL.meta.n_latents)) i = 0;
    document.title = "Latent " + i + " \u2014 " + DL.meta.title;
    document.getElementById("latent-number").textContent = "Latent " + i;
    document.getElementById("prev").setAttribute("href", "#" + Math.max(0, i - 1));
    document.getElementById("next").setAttribute("href", "#" + Math.min(DL.meta.n_latents - 1, i + 1));
    document.body.removeAttribute("data-ready");
    main.textContent = "";
    main.appendChild(el("p", {className: "note", text: "loading\u2026"}));
    loadChunk(chunkOf(i), function (latents) {
      render(latents[i - chunkOf(i) * DL.meta.chunk_size]);
      document.body.setAttribute("data-ready", String(i));
      document.getElementById("render-time").textContent = "rendered in " + (performance.now() - t0).toFixed(0) + " ms";
    }, function (message) {
      main.textContent = "";
      main.appendChild(el("p", {className: "error", text: message}));
      console.error(message);
    });
  }

  function render(latent) {
    main.textContent = "";
    var stats = el("div", {className: "summary"}, [
      el("span", null, [document.createTextNode("density "), el("b", {text: fmt(latent.density)})]),
      el("span", null, [document.createTextNode("fires on "), el("b", {text: latent.fires + " of " + DL.meta.n_tokens}), document.createTextNode(" tokens")]),
      el("span", null, [document.createTextNode("mean when active "), el("b", {text: fmt(latent.mean)})]),
      el("span", null, [document.createTextNode("max "), el("b", {text: fmt(latent.max)})]),
    ]);
    main.appendChild(stats);
    if (latent.fires === 0) main.appendChild(el("p", {className: "note", text: "This latent never fired on the " + DL.meta.n_tokens + " tokens read (dead)."}));
    var histogram = el("div", {className: "panel", id: "activation-histogram"}, [el("h2", {text: "Activation histogram"})]);
    if (latent.fires > 0) histogram.appendChild(histogramSvg(latent.hist, latent.hscale, Math.abs(latent.max)));
    var logits = el("div", {className: "panel", id: "logit-effects"}, [el("h2", {text: "Logit effects"})]);
    if (latent.pos) {
      logits.appendChild(el("div", {className: "row"}, [
        el("div", null, [el("div", {className: "band", text: "promoted"}), logitTable(latent.pos, "pos")]),
        el("div", null, [el("div", {className: "band", text: "suppressed"}), logitTable(latent.neg, "neg")]),
      ]));
    } else {
      logits.appendChild(el("p", {className: "note", text: DL.meta.logits_note || "no logit effects"}));
    }
    main.appendChild(el("div", {className: "row"}, [histogram, logits]));

    var top = el("section", {id: "top-activations"}, [el("h2", {text: "Top activations"})]);
    latent.top.forEach(function (entry) { top.appendChild(contextRow(entry, latent.qscale)); });
    if (!latent.top.length) top.appendChild(el("p", {className: "note", text: "none"}));
    main.appendChild(top);

    var samples = el("section", {id: "quantile-samples"}, [el("h2", {text: "Samples by activation quantile"})]);
    var count = latent.samples.length, bands = [[75, 100], [50, 75], [25, 50], [0, 25]];
    // samples are sorted by value, largest first: sample r of S sits near quantile 1 - (r + 0.5) / S
    bands.forEach(function (band) {
      var members = latent.samples.filter(function (_, r) {
        var quantile = 100 * (1 - (r + 0.5) / count);
        return quantile >= band[0] && (quantile < band[1] || band[1] === 100);
      });
      if (!members.length) return;
      samples.appendChild(el("div", {className: "band", text: "quantiles " + band[0] + "\u2013" + band[1] + "%"}));
      members.forEach(function (entry) { samples.appendChild(contextRow(entry, latent.qscale)); });
    });
    if (!count) samples.appendChild(el("p", {className: "note", text: "none"}));
    else samples.appendChild(el("p", {className: "note", text: count + " activations drawn uniformly from the " + latent.fires + " where the latent fires, sorted by value."}));
    main.appendChild(samples);
  }

  document.getElementById("goto").addEventListener("change", function (event) { location.hash = "#" + event.target.value; });
  window.addEventListener("hashchange", show);
  show();
};
