/** Entry of the single-file browser bundle: the package plus socket.io-client's `io`. */
export * from "./index.js";
export { io } from "socket.io-client";
