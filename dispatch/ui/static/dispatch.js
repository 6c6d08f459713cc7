// The dashboard's only script: live updates over server-sent events, and a confirmation before
// destructive buttons. Pages work without it (they are server-rendered; buttons are forms).
(function () {
  "use strict";
  document.addEventListener("submit", function (e) {
    var question = e.target.getAttribute("data-confirm");
    if (question && !window.confirm(question)) e.preventDefault();
  });
  var topic = document.body.getAttribute("data-topic");
  if (!topic || !window.EventSource) return;
  var status = document.getElementById("live-status");
  // What each live element last received: an unchanged fragment is not re-drawn (the hub
  // sends the whole snapshot at every tick).
  var shown = {};
  var updates = 0;
  var source = new EventSource("/ui/events?topic=" + encodeURIComponent(topic));
  source.onopen = function () {
    status.textContent = "live";
    status.className = "live on";
  };
  source.onerror = function () {
    // EventSource reconnects by itself; a signed-out session gets 401 and stays closed.
    status.textContent = source.readyState === EventSource.CLOSED ? "offline (reload)" : "reconnecting…";
    status.className = "live";
  };
  source.addEventListener("update", function (e) {
    var fragments = JSON.parse(e.data);
    Object.keys(fragments).forEach(function (id) {
      var el = document.getElementById(id);
      if (el && shown[id] !== fragments[id]) {
        // What the reader opened stays open across the swap, and what they typed into a form
        // (a signal's payload, a reason) stays typed, with the cursor where it was.
        var open = {};
        el.querySelectorAll("details[data-keep][open]").forEach(function (d) {
          open[d.getAttribute("data-keep")] = true;
        });
        var typed = {};
        el.querySelectorAll("input[id], textarea[id]").forEach(function (i) {
          if (i.value !== i.defaultValue) typed[i.id] = i.value;
        });
        var active = document.activeElement;
        var focus = active && active.id && el.contains(active) ? active : null;
        el.innerHTML = fragments[id];
        el.querySelectorAll("details[data-keep]").forEach(function (d) {
          if (open[d.getAttribute("data-keep")]) d.open = true;
        });
        Object.keys(typed).forEach(function (key) {
          var i = document.getElementById(key);
          if (i && el.contains(i)) i.value = typed[key];
        });
        var again = focus && document.getElementById(focus.id);
        if (again && el.contains(again)) {
          again.focus();
          if (focus.selectionStart !== null && again.setSelectionRange) {
            again.setSelectionRange(focus.selectionStart, focus.selectionEnd);
          }
        }
        shown[id] = fragments[id];
      }
    });
    updates += 1;
    document.body.setAttribute("data-updates", String(updates));
  });
})();
