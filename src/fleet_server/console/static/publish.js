// Publishing a signed bundle from the models page (progressive enhancement; no inline script).
// The chosen file is sent as the request body (application/octet-stream) to the admin API's
// POST /v1/models, authenticated by the session cookie and the session's CSRF token in the
// X-CSRF-Token header (the API's own route, role check and audit log); then the page reloads,
// or the API's error is shown as text.
(function () {
  "use strict";

  function init() {
    var form = document.getElementById("publish-model");
    if (!form) {
      return;
    }
    var status = document.getElementById("publish-status");
    var button = form.querySelector("button[type=submit]");
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      var input = form.querySelector("input[type=file]");
      var token = form.querySelector("input[name=csrf_token]").value;
      if (!input.files || input.files.length !== 1) {
        status.textContent = "choose one bundle file";
        return;
      }
      var file = input.files[0];
      button.disabled = true;
      status.textContent = "uploading " + file.name + " (" + file.size + " bytes)…";
      fetch(form.getAttribute("data-endpoint"), {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/octet-stream", "X-CSRF-Token": token },
        body: file
      }).then(function (response) {
        return response.json().catch(function () {
          return {};
        }).then(function (answer) {
          if (response.ok) {
            status.textContent = "published " + answer.name + " v" + answer.version;
            window.location.reload();
            return;
          }
          status.textContent = "publish failed (" + response.status + "): " + (answer.error || "");
          button.disabled = false;
        });
      }, function (error) {
        status.textContent = "publish failed: " + error;
        button.disabled = false;
      });
    });
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();
