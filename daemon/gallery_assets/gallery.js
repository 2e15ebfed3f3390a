// crop-clusterd gallery: reads gallery/index.js and gallery/block-*.js (scripts that
// call galleryIndex / galleryBlock, because file:// pages cannot fetch JSON) and
// renders one row per cluster. Rows are rendered a page at a time as the reader
// scrolls, and thumbnails load lazily, so a night of 10,000 clusters opens fast.
(function () {
  "use strict";
  var STRIP = 12; // thumbnails shown before "+N more"
  var PAGE = 150; // rows rendered per step
  var index = null;
  var blocks = {};
  var rows = []; // [id, crops, frames, first, last, [[name, thumb, time], ...], track]
  var order = [];
  var shown = 0;
  var $ = function (id) { return document.getElementById(id); };

  window.galleryIndex = function (data) { index = data; };
  window.galleryBlock = function (block) { blocks[block[0]] = block[1]; }; // [k, rows]

  function load(src, done) {
    var s = document.createElement("script");
    s.src = src;
    s.onload = done;
    s.onerror = done;
    document.body.appendChild(s);
  }

  function encodePath(name) {
    return name.split("/").map(encodeURIComponent).join("/");
  }

  function cropHref(name) {
    if (name.charAt(0) === "/") return "file://" + encodePath(name);
    return (index.root || "") + encodePath(name);
  }

  function text(tag, value, cls) {
    var el = document.createElement(tag);
    el.textContent = value;
    if (cls) el.className = cls;
    return el;
  }

  function thumb(member) {
    var a = document.createElement("a");
    a.href = cropHref(member[0]);
    a.target = "_blank";
    a.title = member[0] + (member[2] ? "\n" + member[2] : "");
    var img = document.createElement("img");
    img.loading = "lazy";
    img.src = "thumbs/" + member[1];
    img.alt = member[0];
    img.dataset.name = member[0];
    a.appendChild(img);
    return a;
  }

  function svg(tag, attrs) {
    var el = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (var k in attrs) el.setAttribute(k, attrs[k]);
    return el;
  }

  // The box track: centres in capture order inside the frame (or, when the frame
  // size is unknown, inside the track's own extent), start green, end red.
  function sketch(track) {
    var w = track[0], h = track[1], xy = track[2], x0 = 0, y0 = 0;
    if (!w || !h) {
      var xs = xy.filter(function (_, i) { return i % 2 === 0; });
      var ys = xy.filter(function (_, i) { return i % 2 === 1; });
      x0 = Math.min.apply(null, xs); y0 = Math.min.apply(null, ys);
      w = Math.max.apply(null, xs) - x0; h = Math.max.apply(null, ys) - y0;
      var pad = Math.max(w, h, 10) * 0.1;
      x0 -= pad; y0 -= pad; w += 2 * pad; h += 2 * pad;
    }
    var r = Math.max(w, h) * 0.025;
    var el = svg("svg", { viewBox: x0 + " " + y0 + " " + w + " " + h, "class": "track" });
    el.appendChild(svg("title", {})).textContent = "box track: " + xy.length / 2 +
      " positions, from green to red" + (track[0] ? "" : " (frame size unknown)");
    el.appendChild(svg("rect", { x: x0, y: y0, width: w, height: h, "class": "frame" }));
    var points = [];
    for (var i = 0; i < xy.length; i += 2) points.push(xy[i] + "," + xy[i + 1]);
    el.appendChild(svg("polyline", { points: points.join(" ") }));
    var n = xy.length;
    el.appendChild(svg("circle", { cx: xy[0], cy: xy[1], r: r, "class": "start" }));
    el.appendChild(svg("circle", { cx: xy[n - 2], cy: xy[n - 1], r: r, "class": "end" }));
    return el;
  }

  function fillStrip(strip, members, from, to) {
    for (var i = from; i < to; i++) strip.appendChild(thumb(members[i]));
  }

  function renderRow(r) {
    var row = document.createElement("section");
    row.className = "row" + (r[1] === 1 ? " singleton" : "");
    row.id = "c" + r[0];
    row.dataset.size = String(r[1]);
    row.dataset.first = r[3] || "";
    row.dataset.last = r[4] || "";
    var meta = document.createElement("div");
    meta.className = "meta";
    meta.appendChild(text("b", "cluster " + r[0]));
    meta.appendChild(text("div", r[1] + (r[1] === 1 ? " crop" : " crops") + " · " +
      r[2] + (r[2] === 1 ? " frame" : " frames")));
    meta.appendChild(text("div", "first " + (r[3] || "–")));
    meta.appendChild(text("div", "last " + (r[4] || "–")));
    if (r[6]) meta.appendChild(sketch(r[6]));
    var strip = document.createElement("div");
    strip.className = "strip";
    var members = r[5];
    fillStrip(strip, members, 0, Math.min(STRIP, members.length));
    if (members.length > STRIP) {
      var more = text("button", "+" + (members.length - STRIP) + " more");
      more.type = "button";
      more.onclick = function () { expand(strip, members); };
      strip.appendChild(more);
    }
    row.appendChild(meta);
    row.appendChild(strip);
    return row;
  }

  function expand(strip, members) {
    var button = strip.querySelector("button");
    if (!button) return;
    strip.removeChild(button);
    fillStrip(strip, members, STRIP, members.length);
  }

  function renderMore(upTo) {
    var main = $("rows");
    var end = Math.min(order.length, Math.max(shown + PAGE, upTo || 0));
    var frag = document.createDocumentFragment();
    for (; shown < end; shown++) {
      var r = order[shown];
      if (r[1] === 1 && (shown === 0 || order[shown - 1][1] !== 1)) {
        frag.appendChild(text("div", "Singletons (one crop each)", "heading"));
      }
      frag.appendChild(renderRow(r));
    }
    main.appendChild(frag);
    document.body.dataset.shown = String(shown);
  }

  function key(r, by) {
    if (by === "first") return r[3] || "\uffff";
    if (by === "last") return r[4] || "";
    return r[1];
  }

  function apply() {
    var by = $("sort").value;
    var min = Math.max(1, parseInt($("minsize").value, 10) || 1);
    order = rows.filter(function (r) { return r[1] >= min; });
    order.sort(function (a, b) {
      var sa = a[1] === 1, sb = b[1] === 1;
      if (sa !== sb) return sa ? 1 : -1; // singletons last whatever the sort
      var ka = key(a, by), kb = key(b, by);
      if (ka !== kb) {
        if (by === "first") return ka < kb ? -1 : 1;
        return ka < kb ? 1 : -1; // size and last seen: largest / latest first
      }
      return a[0] - b[0];
    });
    $("rows").textContent = "";
    shown = 0;
    renderMore();
  }

  function find() {
    var q = $("search").value.trim().toLowerCase();
    $("found").textContent = "";
    if (!q) return;
    var hit = null, name = null;
    for (var i = 0; i < rows.length && !hit; i++) {
      for (var j = 0; j < rows[i][5].length; j++) {
        if (rows[i][5][j][0].toLowerCase().indexOf(q) >= 0) {
          hit = rows[i];
          name = rows[i][5][j][0];
          break;
        }
      }
    }
    if (!hit) { $("found").textContent = "no crop named like that"; return; }
    if (hit[1] < (parseInt($("minsize").value, 10) || 1)) { $("minsize").value = "1"; apply(); }
    var at = order.indexOf(hit);
    if (at >= shown) renderMore(at + 1);
    var old = document.querySelectorAll(".hit");
    for (var k = 0; k < old.length; k++) old[k].classList.remove("hit");
    var row = $("c" + hit[0]);
    var strip = row.querySelector(".strip");
    if (!strip.querySelector('img[data-name="' + CSS.escape(name) + '"]')) expand(strip, hit[5]);
    row.classList.add("hit");
    var img = strip.querySelector('img[data-name="' + CSS.escape(name) + '"]');
    if (img) img.classList.add("hit");
    row.scrollIntoView({ block: "center" });
    $("found").textContent = "in cluster " + hit[0];
    document.body.dataset.found = String(hit[0]);
  }

  function header() {
    var s = index.summary;
    if (index.title) $("title").textContent = "crop-clusterd gallery: " + index.title;
    var when = s.first_time ? ", " + s.first_time + " to " + s.last_time : "";
    $("summary").textContent = s.crops + " crops, " + s.clusters + " clusters (" +
      s.clusters_2plus + " with two or more crops, " + s.singletons + " singletons)" + when +
      (s.closed ? "; session closed" : "; updated with each snapshot: reload for the latest");
    $("activity").src = "activity.png?t=" + Date.now();
  }

  function ready() {
    rows = [];
    index.blocks.forEach(function (b) { rows = rows.concat(blocks[b[0]] || []); });
    header();
    apply();
    document.body.dataset.clusters = String(rows.length);
    document.body.dataset.ready = "1";
  }

  window.galleryShowAll = function () { renderMore(order.length); };

  function start() {
    $("sort").onchange = apply;
    $("minsize").oninput = apply;
    $("find").onclick = find;
    $("search").onkeydown = function (e) { if (e.key === "Enter") find(); };
    if ("IntersectionObserver" in window) {
      new IntersectionObserver(function (entries) {
        if (entries[0].isIntersecting && shown < order.length) renderMore();
      }, { rootMargin: "800px" }).observe($("more"));
    }
    // A query string defeats the cache, so a reload always shows the latest snapshot.
    load("gallery/index.js?t=" + Date.now(), function () {
      if (!index) { $("summary").textContent = "No data yet: the first snapshot writes it."; return; }
      var pending = index.blocks.length;
      if (!pending) { ready(); return; }
      index.blocks.forEach(function (b) {
        load("gallery/block-" + b[0] + ".js?v=" + b[1], function () {
          if (--pending === 0) ready();
        });
      });
    });
  }

  start();
})();
