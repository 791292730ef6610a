/** The login form (landing page and control room). */
import { ApiError, Session } from "./api.js";
import { h } from "./ui.js";

/**
 * Render a login form into `container`; resolves with a Session once the
 * user has logged in.
 */
export function loginForm(container, { title = "ReturnFeed", intro = "" } = {}) {
  return new Promise((resolve) => {
    const user = h("input", { name: "username", autocomplete: "username", required: true });
    const pass = h("input", { name: "password", type: "password", autocomplete: "current-password", required: true });
    const msg = h("p", { class: "error", role: "alert" });
    const submit = h("button", { type: "submit", class: "primary" }, "Log in");
    const form = h("form", { class: "login card", "aria-label": "Log in" },
      h("h1", {}, title),
      intro ? h("p", { class: "muted" }, intro) : null,
      h("label", {}, "User name", user),
      h("label", {}, "Password", pass),
      submit,
      msg);
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      msg.textContent = "";
      submit.disabled = true;
      try {
        const session = await Session.login(user.value.trim(), pass.value);
        pass.value = "";
        resolve(session);
      } catch (err) {
        if (err instanceof ApiError && err.status === 429) {
          const wait = err.headers && err.headers.get("Retry-After");
          msg.textContent = `Too many failed attempts${wait ? `; try again in ${wait} s` : ""}.`;
        } else if (err instanceof ApiError) {
          msg.textContent = err.message;
        } else {
          msg.textContent = "The server cannot be reached.";
        }
      } finally {
        submit.disabled = false;
      }
    });
    container.replaceChildren(form);
    user.focus();
  });
}
