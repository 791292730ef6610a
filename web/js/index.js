/** Landing page: log in, then go to the control room (or `?next=` on this site). */
import { Session } from "./api.js";
import { loginForm } from "./login.js";

function nextUrl() {
  const next = new URLSearchParams(location.search).get("next");
  // Only local paths: never redirect to another site.
  return next && next.startsWith("/") && !next.startsWith("//") ? next : "/control";
}

/** The local CA section, shown only when `returnfeed cert` made one. */
async function showLocalCa() {
  try {
    const res = await fetch("/ca.json", { cache: "no-cache" });
    if (!res.ok) return;
    const ca = await res.json();
    document.getElementById("ca-fingerprint").textContent = ca.fingerprint_sha256;
    document.getElementById("local-ca").hidden = false;
  } catch {
    // No local CA section: the page works without it.
  }
}

async function main() {
  showLocalCa();
  const auth = document.getElementById("auth");
  const signedIn = document.getElementById("signed-in");
  let session = Session.load();
  if (session) {
    auth.hidden = true;
    signedIn.hidden = false;
    document.getElementById("who").textContent = (session.user && session.user.username) || "you";
    document.getElementById("logout").addEventListener("click", async () => {
      await session.logout();
      location.reload();
    });
    return;
  }
  session = await loginForm(auth, { title: "Log in", intro: "Directors and admins log in here." });
  location.assign(nextUrl());
}

main();
