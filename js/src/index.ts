/**
 * socketio-p2p: peer-to-peer events over Socket.IO, for browsers and Node.js.
 *
 * ```js
 * import { io } from "socket.io-client";
 * import { P2P } from "socketio-p2p";
 * const p2p = new P2P(io("http://127.0.0.1:3000"), { rooms: ["chat"] });
 * await p2p.ready;
 * p2p.on("msg", (text, { from }) => console.log(from, text));
 * p2p.emit("msg", "hello");
 * ```
 */
export { P2P, Sender, LOCAL_EVENTS } from "./p2p.js";
export type {
  P2POptions,
  EventMeta,
  Handler,
  AnyHandler,
  AckCallback,
  ReplyFn,
  ReadyInfo,
  Publication,
  ServiceMethods,
  Transport,
} from "./p2p.js";
export { P2PError } from "./errors.js";
export type { P2PErrorCode } from "./errors.js";
export type { MembersPage, PeerInfo, RoomPeers, Welcome } from "./session.js";
export type { P2PStream, IncomingStream } from "./streams.js";
