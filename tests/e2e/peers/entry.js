// Third-party WHIP/WHEP clients for the peer tests, bundled by
// config/bootstrap.sh (esbuild) into .peers/peers.bundle.js and served to
// Chromium by the tests only (page.route), never from web/.
import { WebRTCPlayer } from "@eyevinn/webrtc-player";
import { WHIPClient as EyevinnWHIPClient } from "@eyevinn/whip-web-client";
import { WHEPClient as MedoozeWHEPClient } from "whip-whep/whep.js";
import { WHIPClient as MedoozeWHIPClient } from "whip-whep/whip.js";

window.peers = { WebRTCPlayer, EyevinnWHIPClient, MedoozeWHEPClient, MedoozeWHIPClient };
