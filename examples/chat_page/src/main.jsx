// The examples' chat page: useChat of the AI SDK over createDurableChatTransport.
//
// The server writes every answer into a durable stream and keeps the conversation, so this page
// holds no state of its own: it shows what GET /api/chat/{id}/messages says and follows the
// answer being written, if any. A reload, a second tab or another device on the same URL shows
// the same chat, each message once. The page learns that another tab moved the chat on by
// following the conversation's history stream live (SSE), not by polling.
import { useChat } from "@ai-sdk/react";
import { createDurableChatTransport } from "@durable-streams/aisdk-transport";
import { stream } from "@durable-streams/client";
import { useEffect, useMemo, useRef, useState } from "react";
import { createRoot } from "react-dom/client";

const API = "/api/chat";
// How long to wait before following the history again after the connection failed.
const RETRY_MS = 1000;
// How long Stop waits for the server's end of the answer before it cuts the stream itself.
const STOP_GRACE_MS = 2000;

// The chat id lives in the URL (?chat=<id>), so the URL is the chat's address. Without one, make
// one and put it in the URL without reloading.
function chatIdFromUrl() {
  const url = new URL(window.location.href);
  let id = url.searchParams.get("chat");
  if (!id) {
    id = newId();
    url.searchParams.set("chat", id);
    window.history.replaceState(null, "", url);
  }
  return id;
}

// crypto.randomUUID exists only in secure contexts (https, localhost); getRandomValues everywhere.
function newId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
}

const chatUrl = (chatId, what) => `${API}/${encodeURIComponent(chatId)}/${what}`;

// {messages: the conversation so far, active: the stream URL of the answer being written or null,
//  history: the conversation's own stream, offset: where that view of it ends}
async function fetchConversation(chatId) {
  const response = await fetch(chatUrl(chatId, "messages"), { cache: "no-store" });
  if (!response.ok) throw new Error(`could not load the chat (HTTP ${response.status})`);
  return response.json();
}

const textOf = (message) =>
  message.parts
    .filter((part) => part.type === "text")
    .map((part) => part.text)
    .join("");

// Two lists show the same thing when they hold the same messages with the same text.
const sameMessages = (a, b) => {
  const key = (list) => JSON.stringify(list.map((m) => [m.id, m.role, textOf(m)]));
  return key(a) === key(b);
};

// The server answers errors as {"error": "..."}; the transport passes that body on as the message.
function describe(error) {
  try {
    return JSON.parse(error.message).error ?? error.message;
  } catch {
    return error?.message ?? "something went wrong";
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function Chat({ chatId, initial }) {
  // Did the last reconnect find an answer to follow? (useChat's resumeStream does not say.)
  const reconnected = useRef(false);
  const transport = useMemo(() => {
    const durable = createDurableChatTransport({ api: API });
    return {
      sendMessages: (options) => durable.sendMessages(options),
      reconnectToStream: async (options) => {
        reconnected.current = false;
        const stream = await durable.reconnectToStream(options);
        reconnected.current = stream !== null;
        return stream;
      },
    };
  }, []);
  const { messages, setMessages, sendMessage, resumeStream, stop, status, error } = useChat({
    id: chatId,
    messages: initial.messages,
    transport,
  });

  const [input, setInput] = useState("");
  const [stopping, setStopping] = useState(false);
  const latest = useRef(messages);
  latest.current = messages;
  // Bumped by every Send and Stop: a view of the server fetched before one of them is stale.
  const epoch = useRef(0);
  // One follow() at a time: the first load and the polls do not overlap.
  const following = useRef(false);

  // Show the server's view of the conversation, and follow the answer it is writing, if any.
  async function follow(conversation, seen) {
    while (seen === epoch.current) {
      if (!sameMessages(latest.current, conversation.messages)) setMessages(conversation.messages);
      if (!conversation.active) return;
      // The transport reads the answer's stream from its first chunk and then live, so the
      // answer shows whole, once, however much of it was written before.
      await resumeStream();
      if (reconnected.current) return;
      // Nothing to follow any more: the answer finished in between, and is in the messages now.
      conversation = await fetchConversation(chatId);
    }
  }

  // The server's view changed (a history record arrived): look again, once nothing else is
  // going on. While this tab sends or answers, useChat holds the newest state itself: the look
  // waits until it is done, and one look covers every record that arrived meanwhile.
  const dirty = useRef(false);
  const busy = useRef(false);
  busy.current = status === "submitted" || status === "streaming";
  function look() {
    if (!dirty.current || busy.current || following.current) return;
    dirty.current = false;
    following.current = true;
    const seen = epoch.current;
    fetchConversation(chatId)
      .then((conversation) => follow(conversation, seen))
      .catch(() => {
        dirty.current = true; // offline or the server is restarting: the next record tries again
      })
      .finally(() => {
        following.current = false;
        look();
      });
  }

  // On load: the messages came with the page's first request; follow the answer being written.
  useEffect(() => {
    following.current = true;
    follow(initial, epoch.current)
      .catch(() => {})
      .finally(() => {
        following.current = false;
        look();
      });
  }, []);

  // Follow the conversation's history stream from where the page's view of it ends: every record
  // (a turn sent from anywhere, an answer that ended) makes the page look again.
  useEffect(() => {
    const controller = new AbortController();
    let offset = initial.offset;
    (async () => {
      while (!controller.signal.aborted) {
        try {
          const response = await stream({
            url: initial.history,
            offset,
            live: "sse",
            json: true,
            signal: controller.signal,
          });
          response.subscribeJson((batch) => {
            offset = batch.offset;
            if (batch.items.length > 0) {
              dirty.current = true;
              look();
            }
          });
          await response.closed;
        } catch {
          // the connection failed (or was aborted): follow again from the last offset
        }
        if (!controller.signal.aborted) await sleep(RETRY_MS);
      }
    })();
    return () => controller.abort();
  }, [chatId]);

  // Back to idle: look at what arrived while this tab was busy.
  useEffect(() => {
    if (!busy.current) look();
  }, [status]);

  // Resolves the promise Stop waits on when the answer has ended.
  const ended = useRef(null);
  useEffect(() => {
    if (status === "ready" || status === "error") ended.current?.();
  }, [status]);

  async function onSend(event) {
    event.preventDefault();
    const text = input.trim();
    if (!text) return;
    epoch.current++;
    setInput("");
    await sendMessage({ text });
  }

  async function onStop() {
    epoch.current++;
    setStopping(true);
    const answerEnded = new Promise((resolve) => (ended.current = resolve));
    try {
      // The server ends the answer for every tab and worker: the stream gets an abort chunk and is
      // closed, and this page reads up to that end itself, so it shows exactly the text the server
      // kept (which a reload and the other tabs show too).
      const response = await fetch(chatUrl(chatId, "stop"), { method: "POST" });
      if (response.ok) await Promise.race([answerEnded, sleep(STOP_GRACE_MS)]);
    } catch {
      // The server is out of reach: at least stop here.
    } finally {
      ended.current = null;
      await stop(); // useChat's own stop: a no-op when the stream has already ended
      setStopping(false);
    }
  }

  // Keep the newest text in view.
  const list = useRef(null);
  useEffect(() => {
    list.current?.scrollTo({ top: list.current.scrollHeight });
  }, [messages]);

  const answering = status === "submitted" || status === "streaming";
  const statusText = {
    ready: messages.length ? "Ready" : "Ready: ask something",
    submitted: "Sending…",
    streaming: stopping ? "Stopping…" : "Answering…",
    error: `Error: ${describe(error)}`,
  }[status];

  return (
    <>
      <header>
        <h1>Durable chat</h1>
        <a id="new-chat" href={window.location.pathname}>
          New chat
        </a>
      </header>
      <main id="messages" ref={list}>
        {messages.length === 0 && (
          <p className="hint">
            Ask something, then reload the page or open this URL in another tab while the answer is being written:
            it goes on from where it was, once, everywhere.
          </p>
        )}
        {messages.map((message, index) => (
          <div
            key={message.id}
            className={`message ${message.role}${answering && index === messages.length - 1 ? " live" : ""}`}
            data-role={message.role}
            data-id={message.id}
          >
            <div className="role">{message.role === "user" ? "You" : "Assistant"}</div>
            <div className="text">{textOf(message)}</div>
          </div>
        ))}
      </main>
      <form onSubmit={onSend}>
        <input
          id="prompt"
          value={input}
          onChange={(event) => setInput(event.target.value)}
          placeholder="Ask the model…"
          autoComplete="off"
          autoFocus
        />
        {answering ? (
          <button id="stop" type="button" onClick={onStop} disabled={stopping}>
            Stop
          </button>
        ) : (
          <button id="send" type="submit" disabled={!input.trim()}>
            Send
          </button>
        )}
      </form>
      <p id="status" data-status={status} className={status}>
        {statusText}
      </p>
    </>
  );
}

function App() {
  const chatId = useMemo(chatIdFromUrl, []);
  const [initial, setInitial] = useState(null);
  const [failure, setFailure] = useState(null);
  useEffect(() => {
    fetchConversation(chatId).then(setInitial, (error) => setFailure(error.message));
  }, [chatId]);
  if (initial) return <Chat chatId={chatId} initial={initial} />;
  return (
    <p id="status" data-status={failure ? "error" : "loading"} className={failure ? "error" : ""}>
      {failure ? `Error: ${failure}; reload to try again` : "Loading the chat…"}
    </p>
  );
}

createRoot(document.getElementById("root")).render(<App />);
