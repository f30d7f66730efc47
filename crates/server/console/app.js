// The berth operator console: one hand-written module, no build step, no dependencies.
//
// Every value shown comes from the `/api` routes and may be attacker-controlled (run output, names, descriptions,
// provider messages), so the page is built with DOM APIs and `textContent` only: nothing here parses HTML. The
// session is an HttpOnly cookie this script cannot read; every API call carries `X-Berth-Console: 1`, which the
// server requires beside the cookie (a page on another origin cannot send it).

const CONSOLE_HEADER = "X-Berth-Console";
/** Lines of run output kept on the page; older ones are dropped (the API keeps them all). */
const MAX_OUTPUT_LINES = 20000;
const TERMINAL_RUN = new Set(["succeeded", "failed", "timed_out", "cancelled"]);
const DRIVERS = ["local", "ssh", "sandbox", "plugin"];

// --- small DOM helpers -------------------------------------------------------------------------------------------

/** An element: `attrs` are properties or attributes (`class`, `id`, `on*` handlers, `dataset`); children are nodes
 *  or strings (always text). */
function h(tag, attrs, ...children) {
  const element = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null) continue;
    // `false` sets a property (`spellcheck`, `checked`); as an attribute it means "leave it out".
    if (value === false && !(key in element)) continue;
    if (key === "class") element.className = value;
    else if (key === "dataset") Object.assign(element.dataset, value);
    else if (key.startsWith("on")) element.addEventListener(key.slice(2), value);
    else if (key === "text") element.textContent = value;
    else if (key in element && key !== "list" && key !== "form") element[key] = value;
    else element.setAttribute(key, value === true ? "" : String(value));
  }
  append(element, children);
  return element;
}

function append(parent, children) {
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    parent.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return parent;
}

function clear(element) {
  element.replaceChildren();
  return element;
}

/** A link inside the console (hash routing; ids are encoded so they cannot change the route's shape). */
function link(route, text, attrs) {
  return h("a", { href: "#" + route, ...(attrs || {}) }, text);
}

function badge(status) {
  return h("span", { class: `badge status-${String(status).replace(/[^a-z_]/g, "")}` }, status);
}

function when(timestamp) {
  if (!timestamp) return "";
  const date = new Date(timestamp);
  return Number.isNaN(date.getTime()) ? String(timestamp) : date.toLocaleString();
}

/** An argv as one line, each argument quoted the way a POSIX shell would need it. */
function commandLine(argv) {
  return argv.map((arg) => (/^[A-Za-z0-9_@%+=:,./-]+$/.test(arg) ? arg : `'${arg.replace(/'/g, "'\\''")}'`)).join(" ");
}

function json(value) {
  return h("pre", { class: "json" }, JSON.stringify(value, null, 2));
}

function errorText(error) {
  if (!(error instanceof ApiError)) return String(error && error.message ? error.message : error);
  const lines = [`${error.message}${error.code ? ` (${error.code})` : ""}`];
  for (const detail of error.details) lines.push(`${detail.path || "(body)"}: ${detail.message}`);
  return lines.join("\n");
}

function errorBox(error) {
  return h("p", { class: "error", role: "alert" }, errorText(error));
}

// --- the API -----------------------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code || "";
    this.details = Array.isArray(error.details) ? error.details : [];
  }
}

async function api(method, path, body, extraHeaders) {
  const headers = { [CONSOLE_HEADER]: "1", Accept: "application/json", ...(extraHeaders || {}) };
  const init = { method, headers, credentials: "same-origin", cache: "no-store", redirect: "error" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const text = await response.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!response.ok) {
    const error = new ApiError(response.status, data);
    if (response.status === 401 && session && !path.startsWith("/console/")) signedOut("Your session ended; sign in again.");
    throw error;
  }
  return data;
}

const enc = encodeURIComponent;

// --- session -----------------------------------------------------------------------------------------------------

/** Who is signed in: `{kind: "admin"|"apiKey", role, companyId, companies}`; null when signed out. */
let session = null;
/** Cleanups of the current page (event streams, timers), run when the route changes. */
let pageCleanups = [];

function isManager() {
  return session && (session.kind === "admin" || session.role === "manager");
}

async function loadSession() {
  const whoami = await api("GET", "/api/whoami");
  const next = { kind: whoami.kind, role: "admin", companyId: null, companies: [] };
  if (whoami.kind === "admin") {
    next.companies = await api("GET", "/api/companies");
    const remembered = sessionStorage.getItem("berth.company");
    const known = next.companies.find((company) => company.id === remembered);
    next.companyId = known ? known.id : whoami.defaultCompany && whoami.defaultCompany.id;
  } else {
    next.role = whoami.apiKey.role;
    next.companyId = whoami.apiKey.companyId;
    next.keyName = whoami.apiKey.name;
  }
  session = next;
}

function signedOut(message) {
  session = null;
  runPageCleanups();
  renderChrome();
  renderSignIn(message);
}

async function signIn(token) {
  // The token travels once, in a header, to be exchanged for the HttpOnly session cookie.
  await api("POST", "/console/session", undefined, { Authorization: `Bearer ${token}` });
  await loadSession();
}

async function signOut() {
  try {
    await api("DELETE", "/console/session");
  } finally {
    sessionStorage.clear();
    signedOut("Signed out.");
  }
}

// --- chrome ------------------------------------------------------------------------------------------------------

const main = () => document.getElementById("main");

function renderChrome() {
  const nav = document.getElementById("nav");
  const who = clear(document.getElementById("who"));
  clear(nav);
  nav.hidden = !session;
  if (!session) return;
  const current = location.hash.split("/")[1] || "environments";
  const items = [
    ["environments", "Environments"],
    ["runs", "Runs"],
    ["providers", "Providers"],
  ];
  for (const [route, label] of items) {
    nav.append(link(`/${route}`, label, { id: `nav-${route}`, class: current === route ? "current" : "" }));
  }
  if (session.kind === "admin") {
    const select = h("select", {
      id: "company",
      "aria-label": "Company",
      onchange: () => {
        session.companyId = select.value;
        sessionStorage.setItem("berth.company", select.value);
        route();
      },
    });
    for (const company of session.companies) {
      select.append(h("option", { value: company.id, selected: company.id === session.companyId }, company.name));
    }
    who.append(h("span", {}, "admin · company", select));
  } else {
    who.append(h("span", {}, `${session.role} key “${session.keyName}”`));
  }
  who.append(h("button", { id: "signout", type: "button", onclick: () => signOut() }, "Sign out"));
}

function renderSignIn(message) {
  const input = h("input", {
    id: "token",
    type: "password",
    autocomplete: "off",
    spellcheck: false,
    required: true,
    placeholder: "admin token or company API key",
  });
  const status = h("p", { class: "muted" }, message || "");
  const form = h(
    "form",
    {
      id: "signin-form",
      class: "panel signin",
      onsubmit: async (event) => {
        event.preventDefault();
        const token = input.value.trim();
        if (!token) return;
        status.className = "muted";
        status.textContent = "Signing in…";
        try {
          await signIn(token);
          input.value = "";
          renderChrome();
          route();
        } catch (error) {
          status.className = "error";
          status.textContent = error.status === 401 ? "That token is not valid." : errorText(error);
        }
      },
    },
    h("h1", {}, "Sign in to berth"),
    h(
      "div",
      { class: "field" },
      h("label", { for: "token" }, "Token"),
      input,
      h(
        "span",
        { class: "help" },
        "Paste the admin token (berth serve writes it to <data-dir>/admin-token) or a company API key. It is kept " +
          "for this browser session in a cookie scripts cannot read; sign out forgets it.",
      ),
    ),
    h("button", { id: "signin", class: "primary", type: "submit" }, "Sign in"),
    status,
  );
  clear(main()).append(form);
  input.focus();
}

// --- routing -----------------------------------------------------------------------------------------------------

function runPageCleanups() {
  for (const cleanup of pageCleanups) {
    try {
      cleanup();
    } catch {
      // A cleanup that fails must not keep the next page from rendering.
    }
  }
  pageCleanups = [];
}

function onLeave(cleanup) {
  pageCleanups.push(cleanup);
}

async function route() {
  runPageCleanups();
  if (!session) return;
  renderChrome();
  const container = clear(main());
  try {
    const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
    switch (parts[0] || "environments") {
      case "environments":
        if (parts[1] === "new") await environmentForm(container, null);
        else if (parts[1] && parts[2] === "edit") await environmentForm(container, parts[1]);
        else if (parts[1] && parts[2] === "leases") await leasesPage(container, parts[1]);
        else await environmentsPage(container);
        break;
      case "runs":
        if (parts[1]) await runPage(container, parts[1]);
        else await runsPage(container);
        break;
      case "providers":
        await providersPage(container);
        break;
      default:
        container.append(h("p", {}, "No such page. "), link("/environments", "Environments"));
    }
  } catch (error) {
    if (session) container.append(errorBox(error));
  }
}

// --- environments ------------------------------------------------------------------------------------------------


function companyPath(suffix) {
  return `/api/companies/${enc(session.companyId)}${suffix}`;
}


function probeView(result) {
  return h(
    "div",
    { class: "panel probe-result", id: "probe-result" },
    h("p", {}, h("span", { class: result.ok ? "badge ok" : "badge bad" }, result.ok ? "ok" : "failed"), " ",
      h("span", { class: "summary" }, result.summary)),
    h("details", { open: !result.ok }, h("summary", {}, "Details"), json(result.details)),
  );
}

async function environmentsPage(container) {
  container.append(h("h1", {}, "Environments"));
  if (isManager()) container.append(h("p", {}, link("/environments/new", "New environment", { class: "button", id: "new-environment" })));
  const environments = await api("GET", companyPath("/environments"));
  const panel = h("div", { id: "env-panel" });
  const table = h(
    "table",
    { id: "environments" },
    h("thead", {}, h("tr", {}, ["Name", "Driver", "Status", "Last probe", ""].map((title) => h("th", {}, title)))),
  );
  const body = h("tbody");
  for (const environment of environments) {
    // The newest probe, kept by the API: readers get when and whether it worked, managers its summary too.
    const probe = environment.lastProbe;
    const provider = environment.config && (environment.config.provider || environment.config.driverKey);
    const probeCell = h("td", { class: "last-probe" });
    if (probe) {
      probeCell.append(h("span", { class: probe.ok ? "badge ok" : "badge bad" }, probe.ok ? "ok" : "failed"), " ");
      if (probe.summary) probeCell.append(probe.summary, " ");
      probeCell.append(h("span", { class: "muted" }, when(probe.at)));
    } else probeCell.append(h("span", { class: "muted" }, "never"));
    const actions = h("td", { class: "actions" });
    actions.append(
      h("button", {
        type: "button",
        class: "probe",
        onclick: async (event) => {
          event.target.disabled = true;
          clear(panel).append(h("p", { class: "muted" }, `Testing ${environment.name}…`));
          try {
            const result = await api("POST", `/api/environments/${enc(environment.id)}/probe`);
            clear(probeCell).append(h("span", { class: result.ok ? "badge ok" : "badge bad" }, result.ok ? "ok" : "failed"), " ", result.summary);
            clear(panel).append(h("h2", {}, `Test of ${environment.name}`), probeView(result));
          } catch (error) {
            clear(panel).append(errorBox(error));
          } finally {
            event.target.disabled = false;
          }
        },
      }, "Test"),
    );
    if (isManager()) {
      actions.append(
        link(`/environments/${enc(environment.id)}/edit`, "Edit", { class: "button edit" }),
        link(`/environments/${enc(environment.id)}/leases`, "Leases", { class: "button leases" }),
        h("button", { type: "button", class: "danger delete", onclick: () => confirmDelete(panel, environment) }, "Delete"),
      );
    }
    body.append(
      h(
        "tr",
        { dataset: { envId: environment.id } },
        h(
          "td",
          {},
          h("span", { class: "env-name" }, environment.name),
          environment.description ? h("span", { class: "help muted" }, " — ", environment.description) : null,
          environment.configRedacted
            ? h("span", { class: "help muted config-redacted" }, "configuration redacted")
            : h("details", { class: "config" }, h("summary", {}, "configuration"), json(environment.config)),
        ),
        h("td", {}, environment.driver, provider ? h("span", { class: "muted" }, ` (${provider})`) : null),
        h("td", {}, badge(environment.status)),
        probeCell,
        actions,
      ),
    );
  }
  table.append(body);
  container.append(table, panel);
  if (session.role === "reader") container.append(h("p", { class: "muted" }, "A reader key sees configurations redacted and no leases."));
}

/** Before deleting, show what the deletion will cancel and release. */
async function confirmDelete(panel, environment) {
  clear(panel).append(h("p", { class: "muted" }, "Looking up what this environment holds…"));
  try {
    const [leases, runs] = await Promise.all([
      api("GET", `/api/environments/${enc(environment.id)}/leases`),
      api("GET", companyPath("/runs?limit=1000")),
    ]);
    const held = leases.filter((lease) => lease.status === "active" || lease.status === "retained");
    const live = runs.filter((run) => run.environmentId === environment.id && !TERMINAL_RUN.has(run.status));
    const list = h("ul", { id: "delete-impact" });
    for (const run of live) list.append(h("li", {}, "cancel run ", link(`/runs/${enc(run.id)}`, run.id), ` (${run.status}): `, commandLine(run.command)));
    for (const lease of held) list.append(h("li", {}, `release ${lease.status} lease ${lease.id}`, lease.provider ? ` on ${lease.provider}` : "", lease.providerLeaseId ? ` (${lease.providerLeaseId})` : ""));
    if (!live.length && !held.length) list.append(h("li", {}, "nothing: no live run, no active or retained lease"));
    clear(panel).append(
      h(
        "div",
        { class: "panel", id: "delete-confirm" },
        h("h2", {}, "Delete ", h("span", {}, environment.name), "?"),
        h("p", {}, "Deleting it will:"),
        list,
        h(
          "div",
          { class: "actions" },
          h("button", {
            type: "button",
            class: "danger",
            id: "confirm-delete",
            onclick: async () => {
              try {
                await api("DELETE", `/api/environments/${enc(environment.id)}`);
                route();
              } catch (error) {
                panel.append(errorBox(error));
              }
            },
          }, "Delete"),
          h("button", { type: "button", id: "keep-environment", onclick: () => clear(panel) }, "Keep it"),
        ),
      ),
    );
  } catch (error) {
    clear(panel).append(errorBox(error));
  }
}

// --- forms generated from JSON Schema ----------------------------------------------------------------------------

/** The SSH driver's config, described like a provider's so the same generator draws it. `x-write-only` secrets are
 *  never returned: the stored config holds `<name>SecretRef` instead. */
const SSH_SCHEMA = {
  type: "object",
  required: ["host", "username", "remoteWorkspacePath"],
  properties: {
    host: { type: "string" },
    port: { type: "integer", default: 22, minimum: 1, maximum: 65535 },
    username: { type: "string" },
    remoteWorkspacePath: { type: "string", description: "An absolute path on the remote host." },
    privateKey: { type: "string", format: "secret-ref", "x-write-only": "privateKeySecretRef", "x-multiline": true, description: "OpenSSH or PEM private key." },
    password: { type: "string", format: "secret-ref", "x-write-only": "passwordSecretRef", description: "The login password, or the private key's passphrase." },
    knownHosts: { type: "string", "x-multiline": true, description: "known_hosts lines pinning the host key." },
    strictHostKeyChecking: { type: "boolean", default: true },
    workspaceMode: { type: "string", enum: ["per_run", "persistent"], default: "per_run" },
    syncExclude: { type: "array", items: { type: "string" }, description: "Patterns the workspace sync leaves alone." },
    syncBackMaxMb: { type: "integer", minimum: 1, maximum: 1048576, description: "Most file content one sync-back brings back, MiB (default 1024)." },
  },
};

/** allOf parts merged into one object schema (their properties and required lists). */
function flatten(schema) {
  if (!schema || !Array.isArray(schema.allOf)) return schema || {};
  const merged = { ...schema, properties: { ...(schema.properties || {}) }, required: [...(schema.required || [])] };
  delete merged.allOf;
  for (const part of schema.allOf.map(flatten)) {
    Object.assign(merged.properties, part.properties || {});
    merged.required.push(...(part.required || []));
    if (!merged.type && part.type) merged.type = part.type;
  }
  return merged;
}

function schemaType(schema) {
  if (Array.isArray(schema.type)) return schema.type.find((type) => type !== "null") || "string";
  if (schema.type) return schema.type;
  if (schema.properties) return "object";
  if (Array.isArray(schema.enum)) return "string";
  return "json";
}

function isSecret(schema) {
  return schema.format === "secret-ref";
}

let fieldSerial = 0;

/**
 * A form control for `schema` at `path` (dotted, as the API's validation errors name it), holding `value`.
 * Returns `{element, read}`; `read()` gives the value to send, or `undefined` to leave the field out.
 */
function schemaField(name, rawSchema, path, value, required, context) {
  const schema = flatten(rawSchema);
  const type = schemaType(schema);
  const id = `f${++fieldSerial}`;
  const label = name === null ? null : h("label", { for: id }, name, required ? h("span", { class: "req", title: "required" }, "*") : null);
  const help = schema.description ? h("span", { class: "help" }, schema.description) : null;
  const wrap = (control, ...extra) => h("div", { class: "field", dataset: { path } }, label, control, ...extra, help);
  const initial = value === undefined ? schema.default : value;

  if (isSecret(schema)) {
    // Stored secrets come back as {"secretRef": id} (or, for SSH's write-only keys, as a sibling `…SecretRef`):
    // the value is never shown; leaving the input empty keeps it, typing replaces it.
    const storedRef = schema["x-write-only"] ? context.stored && context.stored[schema["x-write-only"]] : value && typeof value === "object" ? value.secretRef : null;
    const input = schema["x-multiline"]
      ? h("textarea", { id, name: path, class: "secret", autocomplete: "off", spellcheck: false })
      : h("input", { id, name: path, type: "password", autocomplete: "new-password" });
    input.placeholder = storedRef ? "stored — type a new value to replace it" : "secret value";
    const state = h("span", { class: storedRef ? "badge ok secret-state" : "badge secret-state" }, storedRef ? "stored" : "not set");
    return {
      element: wrap(input, state),
      read() {
        if (input.value !== "") return input.value;
        if (storedRef && !schema["x-write-only"]) return { secretRef: storedRef };
        return undefined;
      },
    };
  }
  if (Array.isArray(schema.enum)) {
    const select = h("select", { id, name: path });
    if (!required || initial === undefined) select.append(h("option", { value: "" }, "—"));
    for (const option of schema.enum) select.append(h("option", { value: JSON.stringify(option), selected: option === initial }, String(option)));
    return { element: wrap(select), read: () => (select.value === "" ? undefined : JSON.parse(select.value)) };
  }
  switch (type) {
    case "boolean": {
      const input = h("input", { id, name: path, type: "checkbox", checked: initial === true });
      // Sent only when it says something: set, or different from the default.
      return { element: wrap(input), read: () => (input.checked === (schema.default === true) && value === undefined && !required ? undefined : input.checked) };
    }
    case "integer":
    case "number": {
      const input = h("input", { id, name: path, type: "number", step: type === "integer" ? "1" : "any" });
      if (typeof schema.minimum === "number") input.min = String(schema.minimum);
      if (typeof schema.maximum === "number") input.max = String(schema.maximum);
      if (initial !== undefined && initial !== null) input.value = String(initial);
      return { element: wrap(input), read: () => (input.value.trim() === "" ? undefined : Number(input.value)) };
    }
    case "string": {
      const input = schema["x-multiline"]
        ? h("textarea", { id, name: path, spellcheck: false })
        : h("input", { id, name: path, type: "text", spellcheck: false });
      if (typeof initial === "string") input.value = initial;
      if (typeof schema.maxLength === "number") input.maxLength = schema.maxLength;
      return { element: wrap(input), read: () => (input.value === "" && !required ? undefined : input.value) };
    }
    case "array": {
      const items = flatten(schema.items || {});
      const list = h("div", { class: "array-items" });
      const entries = [];
      const add = (itemValue) => {
        const entry = schemaField(null, items, `${path}.${entries.length}`, itemValue, true, context);
        const row = h("div", { class: "array-item" }, entry.element);
        const record = { entry, row };
        row.append(h("button", { type: "button", onclick: () => { entries.splice(entries.indexOf(record), 1); row.remove(); } }, "Remove"));
        entries.push(record);
        list.append(row);
      };
      for (const item of Array.isArray(initial) ? initial : []) add(item);
      const fieldset = h("fieldset", { dataset: { path } }, h("legend", {}, name || "items", required ? " *" : ""), help, list,
        h("button", { type: "button", class: "add-item", onclick: () => add(undefined) }, "Add"));
      return {
        element: fieldset,
        read() {
          const values = entries.map((record) => record.entry.read()).filter((item) => item !== undefined);
          return values.length || required || Array.isArray(value) ? values : undefined;
        },
      };
    }
    case "object": {
      if (!schema.properties) break;
      const group = objectFields(schema, path, value && typeof value === "object" ? value : {}, context);
      const fieldset = h("fieldset", { dataset: { path } }, name === null ? null : h("legend", {}, name), help, group.elements);
      return {
        element: fieldset,
        read() {
          const object = group.read();
          return Object.keys(object).length || required || value !== undefined ? object : undefined;
        },
      };
    }
    default:
      break;
  }
  // Anything the generator does not draw (oneOf, anyOf, free-form objects): JSON, checked by the server.
  const area = h("textarea", { id, name: path, spellcheck: false, class: "json-input" });
  if (initial !== undefined) area.value = JSON.stringify(initial, null, 2);
  return {
    element: wrap(area, h("span", { class: "help" }, "JSON")),
    read() {
      if (area.value.trim() === "") return undefined;
      try {
        return JSON.parse(area.value);
      } catch {
        throw new ApiError(422, { error: { message: `${path}: not valid JSON`, code: "validation_failed", details: [{ path, message: "not valid JSON" }] } });
      }
    },
  };
}

/** Controls for every property of an object schema; `read()` collects the ones that say something. */
function objectFields(rawSchema, path, value, context) {
  const schema = flatten(rawSchema);
  const required = new Set(schema.required || []);
  const fields = [];
  for (const [name, property] of Object.entries(schema.properties || {})) {
    fields.push([name, schemaField(name, property, path ? `${path}.${name}` : name, value[name], required.has(name), context)]);
  }
  return {
    elements: fields.map(([, field]) => field.element),
    read() {
      const object = {};
      for (const [name, field] of fields) {
        const fieldValue = field.read();
        if (fieldValue !== undefined) object[name] = fieldValue;
      }
      return object;
    },
  };
}

/** Marks the fields a 422 names, and lists every problem. */
function showValidation(form, box, error) {
  for (const marked of form.querySelectorAll(".invalid")) marked.classList.remove("invalid");
  for (const note of form.querySelectorAll(".field-error")) note.remove();
  for (const detail of error.details || []) {
    for (const field of form.querySelectorAll("[data-path]")) {
      if (field.dataset.path === detail.path) {
        field.classList.add("invalid");
        field.append(h("span", { class: "field-error" }, detail.message));
      }
    }
  }
  clear(box).append(errorBox(error));
}

async function environmentForm(container, environmentId) {
  const editing = environmentId !== null;
  const [capabilities, environment] = await Promise.all([
    api("GET", companyPath("/environments/capabilities")),
    editing ? api("GET", `/api/environments/${enc(environmentId)}`) : Promise.resolve(null),
  ]);
  container.append(h("h1", {}, editing ? "Edit " : "New environment", editing ? h("span", {}, environment.name) : null));
  const providers = capabilities.sandboxProviders || {};
  const pluginDrivers = (capabilities.drivers.plugin && capabilities.drivers.plugin.environmentDrivers) || {};

  const name = h("input", { id: "env-name", type: "text", required: true, value: editing ? environment.name : "" });
  const description = h("input", { id: "env-description", type: "text", value: editing && environment.description ? environment.description : "" });
  const driver = h("select", { id: "env-driver" });
  for (const key of DRIVERS) driver.append(h("option", { value: key, selected: editing ? environment.driver === key : key === "sandbox" }, key));
  const status = h("select", { id: "env-status" }, ["active", "archived"].map((value) => h("option", { value, selected: editing && environment.status === value }, value)));
  const configBox = h("div", { id: "env-config" });
  const result = h("div", { id: "env-result" });
  let readConfig = () => ({});

  const storedConfig = () => (editing && environment.driver === driver.value ? environment.config || {} : {});

  function drawConfig() {
    clear(configBox);
    const stored = storedConfig();
    const context = { stored };
    switch (driver.value) {
      case "local":
        configBox.append(h("p", { class: "muted" }, "Runs commands on the berth host. Nothing to configure."));
        readConfig = () => ({});
        break;
      case "ssh": {
        const group = objectFields(SSH_SCHEMA, "config", stored, context);
        configBox.append(h("fieldset", {}, h("legend", {}, "SSH"), group.elements));
        readConfig = () => group.read();
        break;
      }
      case "sandbox": {
        const keys = Object.keys(providers);
        const provider = h("select", { id: "env-provider" });
        for (const key of keys) {
          const info = providers[key];
          provider.append(h("option", { value: key, selected: stored.provider === key }, `${info.displayName || key} (${key}) — ${info.status}`));
        }
        const common = objectFields(
          {
            properties: {
              reuseLease: { type: "boolean", default: false, description: "Keep the sandbox between runs." },
              timeoutMs: { type: "integer", minimum: 1, description: "How long a retained sandbox is kept, in ms." },
            },
          },
          "config",
          stored,
          context,
        );
        const providerBox = h("div", { id: "env-provider-fields" });
        let providerFields = objectFields({}, "config", {}, context);
        const drawProvider = () => {
          const info = providers[provider.value] || {};
          const values = stored.provider === provider.value ? stored : {};
          providerFields = objectFields(info.configSchema || {}, "config", values, context);
          append(clear(providerBox), [
            info.description ? h("p", { class: "muted" }, info.description) : null,
            info.status !== "ready" ? h("p", { class: "error" }, `This provider is ${info.status}${info.reason ? `: ${info.reason}` : ""}`) : null,
            providerFields.elements,
          ]);
        };
        provider.addEventListener("change", drawProvider);
        drawProvider();
        configBox.append(
          h("div", { class: "field", dataset: { path: "config.provider" } }, h("label", { for: "env-provider" }, "Provider"), provider),
          providerBox,
          h("fieldset", {}, h("legend", {}, "Leases"), common.elements),
        );
        readConfig = () => ({ provider: provider.value, ...common.read(), ...providerFields.read() });
        break;
      }
      case "plugin": {
        const keys = Object.keys(pluginDrivers);
        if (!keys.length) {
          configBox.append(h("p", { class: "muted" }, "No plugin offers an environment driver on this server."));
          readConfig = () => ({});
          break;
        }
        const select = h("select", { id: "env-plugin-driver" });
        for (const key of keys) {
          const info = pluginDrivers[key];
          select.append(h("option", { value: key, selected: stored.driverKey === key }, `${info.displayName || key} (${info.pluginKey}/${key}) — ${info.status}`));
        }
        const box = h("div");
        let fields = objectFields({}, "config.driverConfig", {}, context);
        const draw = () => {
          const info = pluginDrivers[select.value] || {};
          const values = stored.driverKey === select.value ? stored.driverConfig || {} : {};
          fields = objectFields(info.configSchema || {}, "config.driverConfig", values, context);
          append(clear(box), [info.description ? h("p", { class: "muted" }, info.description) : null, fields.elements]);
        };
        select.addEventListener("change", draw);
        draw();
        configBox.append(h("div", { class: "field" }, h("label", { for: "env-plugin-driver" }, "Plugin driver"), select), box);
        readConfig = () => ({ pluginKey: pluginDrivers[select.value].pluginKey, driverKey: select.value, driverConfig: fields.read() });
        break;
      }
      default:
        readConfig = () => ({});
    }
  }
  driver.addEventListener("change", drawConfig);
  drawConfig();

  /** The config to send. On an edit of the same driver the API merges top-level keys, so a key the form no
   *  longer has is sent as null to remove it (SSH's stored secret references stay unless replaced). */
  function configToSend() {
    const config = readConfig();
    if (editing && environment.driver === driver.value && driver.value !== "plugin") {
      for (const key of Object.keys(environment.config || {})) {
        if (!(key in config) && !key.endsWith("SecretRef")) config[key] = null;
      }
    }
    return config;
  }

  const form = h(
    "form",
    {
      id: "env-form",
      class: "panel",
      // The server checks the config against the schema and reports every problem at once, at its path.
      noValidate: true,
      onsubmit: async (event) => {
        event.preventDefault();
        clear(result).append(h("p", { class: "muted" }, "Saving…"));
        try {
          const body = { name: name.value, description: description.value || null, driver: driver.value, config: configToSend() };
          if (editing) {
            body.status = status.value;
            await api("PATCH", `/api/environments/${enc(environmentId)}`, body);
          } else {
            if (!body.description) delete body.description;
            await api("POST", companyPath("/environments"), body);
          }
          location.hash = "#/environments";
        } catch (error) {
          showValidation(form, result, error);
        }
      },
    },
    h("div", { class: "field", dataset: { path: "name" } }, h("label", { for: "env-name" }, "Name", h("span", { class: "req" }, "*")), name),
    h("div", { class: "field", dataset: { path: "description" } }, h("label", { for: "env-description" }, "Description"), description),
    h("div", { class: "field", dataset: { path: "driver" } }, h("label", { for: "env-driver" }, "Driver"), driver),
    editing ? h("div", { class: "field", dataset: { path: "status" } }, h("label", { for: "env-status" }, "Status"), status) : null,
    configBox,
    h(
      "div",
      { class: "actions" },
      h("button", {
        type: "button",
        id: "env-test",
        onclick: async (event) => {
          event.target.disabled = true;
          clear(result).append(h("p", { class: "muted" }, "Testing…"));
          try {
            // A new config is probed unsaved (nothing stored); an edit probes the saved environment, whose stored
            // secrets only the server can open.
            const probe = editing
              ? await api("POST", `/api/environments/${enc(environmentId)}/probe`)
              : await api("POST", companyPath("/environments/probe-config"), { driver: driver.value, config: configToSend(), name: name.value || undefined });
            append(clear(result), [editing ? h("p", { class: "muted" }, "Tested the saved configuration.") : null, probeView(probe)]);
          } catch (error) {
            showValidation(form, result, error);
          } finally {
            event.target.disabled = false;
          }
        },
      }, "Test"),
      h("button", { type: "submit", class: "primary", id: "env-save" }, editing ? "Save" : "Create"),
      link("/environments", "Cancel", { class: "button" }),
    ),
    result,
  );
  container.append(form);
}

// --- leases and providers ----------------------------------------------------------------------------------------

function leaseEnding(lease) {
  switch (lease.status) {
    case "active":
      return "in use";
    case "retained":
      return lease.expiresAt ? `kept for reuse until ${when(lease.expiresAt)}` : "kept for reuse";
    case "released":
      return lease.failureReason ? `released: ${lease.failureReason}` : "released when its run ended";
    case "expired":
      return lease.failureReason ? `expired: ${lease.failureReason}` : "expired unused";
    case "failed":
      return `failed: ${lease.failureReason || "no reason recorded"}`;
    default:
      return lease.failureReason || "";
  }
}

async function leasesPage(container, environmentId) {
  const [environment, leases] = await Promise.all([
    api("GET", `/api/environments/${enc(environmentId)}`),
    api("GET", `/api/environments/${enc(environmentId)}/leases`),
  ]);
  container.append(h("h1", {}, "Leases of ", h("span", {}, environment.name)), h("p", {}, link("/environments", "← Environments")));
  if (!leases.length) {
    container.append(h("p", { class: "muted" }, "No lease yet."));
    return;
  }
  const table = h("table", { id: "leases" }, h("thead", {}, h("tr", {}, ["Lease", "Status", "Policy", "Provider", "Run", "Timeline", "Ended", "Cleanup"].map((title) => h("th", {}, title)))));
  const body = h("tbody");
  const sorted = [...leases].sort((a, b) => String(b.acquiredAt).localeCompare(String(a.acquiredAt)));
  for (const lease of sorted) {
    const timeline = h("ul", { class: "timeline" }, h("li", {}, h("span", { class: "at" }, when(lease.acquiredAt)), "acquired"));
    if (lease.lastUsedAt && lease.lastUsedAt !== lease.acquiredAt) timeline.append(h("li", {}, h("span", { class: "at" }, when(lease.lastUsedAt)), "last used"));
    if (lease.releasedAt) timeline.append(h("li", {}, h("span", { class: "at" }, when(lease.releasedAt)), lease.status));
    else if (lease.expiresAt) timeline.append(h("li", {}, h("span", { class: "at" }, when(lease.expiresAt)), "expires"));
    body.append(
      h(
        "tr",
        { dataset: { leaseId: lease.id } },
        h("td", { class: "wrap" }, lease.id),
        h("td", {}, badge(lease.status)),
        h("td", {}, lease.leasePolicy),
        h("td", { class: "wrap" }, lease.provider || lease.driver || "", lease.providerLeaseId ? h("span", { class: "muted" }, ` ${lease.providerLeaseId}`) : null),
        h("td", { class: "wrap" }, lease.runId ? link(`/runs/${enc(lease.runId)}`, lease.runId) : ""),
        h("td", {}, timeline),
        h("td", { class: "lease-ending" }, leaseEnding(lease)),
        h("td", {}, lease.cleanupStatus ? badge(lease.cleanupStatus) : ""),
      ),
    );
  }
  table.append(body);
  container.append(table);
}

async function providersPage(container) {
  const capabilities = await api("GET", companyPath("/environments/capabilities"));
  container.append(h("h1", {}, "Drivers and providers"));
  const drivers = h("table", { id: "drivers" }, h("thead", {}, h("tr", {}, ["Driver", "Status", "Runs commands"].map((title) => h("th", {}, title)))));
  const driverRows = h("tbody");
  for (const [key, info] of Object.entries(capabilities.drivers || {})) {
    driverRows.append(h("tr", {}, h("td", {}, key), h("td", {}, badge(info.status), info.reason ? ` ${info.reason}` : ""), h("td", {}, info.supportsRunExecution ? "yes" : "no")));
  }
  drivers.append(driverRows);
  container.append(drivers);
  const describe = (title, entries, id) => {
    container.append(h("h2", {}, title));
    if (!entries.length) {
      container.append(h("p", { class: "muted" }, "None."));
      return;
    }
    const table = h("table", { id }, h("thead", {}, h("tr", {}, ["Key", "Name", "Source", "Status", "Reusable leases"].map((heading) => h("th", {}, heading)))));
    const rows = h("tbody");
    for (const [key, info] of entries) {
      rows.append(
        h(
          "tr",
          { dataset: { key } },
          h("td", {}, key),
          h("td", {}, info.displayName || "", info.description ? h("span", { class: "help muted" }, info.description) : null),
          h("td", {}, info.source || "", info.pluginKey ? ` (${info.pluginKey})` : ""),
          h("td", {}, badge(info.status), info.reason ? h("span", { class: "muted" }, ` ${info.reason}`) : null),
          h("td", {}, info.supportsReusableLeases ? "yes" : "no"),
        ),
      );
    }
    table.append(rows);
    container.append(table);
  };
  describe("Sandbox providers", Object.entries(capabilities.sandboxProviders || {}), "providers");
  const plugin = (capabilities.drivers && capabilities.drivers.plugin) || {};
  describe("Plugin environment drivers", Object.entries(plugin.environmentDrivers || {}), "plugin-drivers");
  if (plugin.problems && plugin.problems.length) {
    container.append(h("h2", {}, "Plugin problems"), h("ul", { class: "error" }, plugin.problems.map((problem) => h("li", {}, problem))));
  }
}

// --- runs --------------------------------------------------------------------------------------------------------

/** Splits a command line like a POSIX shell's words (quotes and backslashes), without expanding anything: berth
 *  never runs a command through a shell, so this only saves typing an argv by hand. */
function splitWords(line) {
  const words = [];
  let word = null;
  let quote = null;
  for (let i = 0; i < line.length; i++) {
    const c = line[i];
    if (quote === "'") {
      if (c === "'") quote = null;
      else word += c;
    } else if (quote === '"') {
      if (c === '"') quote = null;
      else if (c === "\\" && i + 1 < line.length && '"\\$`'.includes(line[i + 1])) word += line[++i];
      else word += c;
    } else if (c === "'" || c === '"') {
      quote = c;
      word = word === null ? "" : word;
    } else if (c === "\\" && i + 1 < line.length) {
      word = (word === null ? "" : word) + line[++i];
    } else if (/\s/.test(c)) {
      if (word !== null) words.push(word);
      word = null;
    } else {
      word = (word === null ? "" : word) + c;
    }
  }
  if (quote) throw new Error("unterminated quote in the command");
  if (word !== null) words.push(word);
  return words;
}

function parseEnv(text) {
  const env = {};
  for (const line of text.split("\n")) {
    if (!line.trim()) continue;
    const at = line.indexOf("=");
    if (at <= 0) throw new Error(`environment line without NAME=value: ${line}`);
    env[line.slice(0, at).trim()] = line.slice(at + 1);
  }
  return env;
}

async function runsPage(container) {
  container.append(h("h1", {}, "Runs"));
  const environments = await api("GET", companyPath("/environments"));
  const names = new Map(environments.map((environment) => [environment.id, environment.name]));
  if (isManager()) container.append(startRunForm(environments.filter((environment) => environment.status === "active")));
  const table = h("table", { id: "runs" }, h("thead", {}, h("tr", {}, ["Run", "Environment", "Command", "Status", "Exit", "Created"].map((title) => h("th", {}, title)))));
  const body = h("tbody");
  table.append(body);
  const problem = h("div");
  container.append(h("h2", {}, "Recent runs"), table, problem);
  const refresh = async () => {
    try {
      const runs = await api("GET", companyPath("/runs?limit=200"));
      const rows = runs.map((run) =>
        h(
          "tr",
          { dataset: { runId: run.id } },
          h("td", { class: "wrap" }, link(`/runs/${enc(run.id)}`, run.id.slice(0, 8))),
          h("td", {}, names.get(run.environmentId) || run.environmentId),
          h("td", { class: "wrap" }, h("code", {}, commandLine(run.command))),
          h("td", { class: "run-status" }, badge(run.status)),
          h("td", {}, run.exitCode === null || run.exitCode === undefined ? (run.signal || "") : String(run.exitCode)),
          h("td", {}, when(run.createdAt)),
        ),
      );
      body.replaceChildren(...rows);
      clear(problem);
    } catch (error) {
      clear(problem).append(errorBox(error));
    }
  };
  await refresh();
  // No list stream exists: poll while the page is open, slowly when the tab is hidden.
  let timer = 0;
  let left = false;
  const tick = async () => {
    await refresh();
    if (!left) timer = setTimeout(tick, document.hidden ? 10000 : 2000);
  };
  timer = setTimeout(tick, 2000);
  onLeave(() => {
    left = true;
    clearTimeout(timer);
  });
}

function startRunForm(environments) {
  const environment = h("select", { id: "run-env" });
  for (const entry of environments) environment.append(h("option", { value: entry.id }, `${entry.name} (${entry.driver})`));
  const command = h("input", { id: "run-command", type: "text", spellcheck: false, placeholder: "sh -c 'echo hello'" });
  const preview = h("span", { class: "help", id: "run-argv" });
  command.addEventListener("input", () => {
    try {
      preview.textContent = `argv: ${JSON.stringify(splitWords(command.value))}`;
    } catch (error) {
      preview.textContent = error.message;
    }
  });
  const env = h("textarea", { id: "run-env-vars", spellcheck: false, placeholder: "NAME=value, one a line" });
  const timeout = h("input", { id: "run-timeout", type: "number", min: "1", step: "1", placeholder: "seconds" });
  const result = h("div");
  const form = h(
    "form",
    {
      id: "run-form",
      class: "panel",
      onsubmit: async (event) => {
        event.preventDefault();
        try {
          const body = { environmentId: environment.value, command: splitWords(command.value) };
          const variables = parseEnv(env.value);
          if (Object.keys(variables).length) body.env = variables;
          if (timeout.value.trim()) body.timeoutMs = Math.round(Number(timeout.value) * 1000);
          const run = await api("POST", companyPath("/runs"), body);
          location.hash = `#/runs/${enc(run.id)}`;
        } catch (error) {
          showValidation(form, result, error);
        }
      },
    },
    h("h2", {}, "Start a run"),
    h("div", { class: "field", dataset: { path: "environmentId" } }, h("label", { for: "run-env" }, "Environment"), environment),
    h("div", { class: "field", dataset: { path: "command" } }, h("label", { for: "run-command" }, "Command"), command, preview,
      h("span", { class: "help" }, "Split into an argv like a shell would (quotes, backslashes); never run through a shell.")),
    h("div", { class: "field", dataset: { path: "env" } }, h("label", { for: "run-env-vars" }, "Environment variables"), env),
    h("div", { class: "field", dataset: { path: "timeoutMs" } }, h("label", { for: "run-timeout" }, "Timeout (seconds)"), timeout),
    h("button", { type: "submit", class: "primary", id: "run-start" }, "Start"),
    result,
  );
  return form;
}

// --- ANSI colours ------------------------------------------------------------------------------------------------

/** SGR state of one stream, carried across output events. */
function ansiState() {
  return { fg: null, bg: null, bold: false, dim: false, italic: false, underline: false };
}

function applySgr(state, params) {
  const codes = params === "" ? [0] : params.split(";").map((part) => (part === "" ? 0 : Number(part)));
  for (let i = 0; i < codes.length; i++) {
    const code = codes[i];
    if (code === 0) Object.assign(state, ansiState());
    else if (code === 1) state.bold = true;
    else if (code === 2) state.dim = true;
    else if (code === 3) state.italic = true;
    else if (code === 4) state.underline = true;
    else if (code === 22) state.bold = state.dim = false;
    else if (code === 23) state.italic = false;
    else if (code === 24) state.underline = false;
    else if ((code >= 30 && code <= 37) || (code >= 90 && code <= 97)) state.fg = code;
    else if (code === 39) state.fg = null;
    else if ((code >= 40 && code <= 47) || (code >= 100 && code <= 107)) state.bg = code;
    else if (code === 49) state.bg = null;
    else if (code === 38 || code === 48) {
      // 256-colour and true-colour: the first 16 palette entries map to classes; the rest keep the default.
      const mode = codes[i + 1];
      if (mode === 5) {
        const index = codes[i + 2];
        if (index >= 0 && index < 16) {
          const base = index < 8 ? 30 + index : 90 + index - 8;
          if (code === 38) state.fg = base;
          else state.bg = base + 10;
        }
        i += 2;
      } else if (mode === 2) {
        i += 4;
      }
    }
  }
}

function ansiClasses(state) {
  const classes = [];
  if (state.fg !== null) classes.push(`ansi-fg-${state.fg}`);
  if (state.bg !== null) classes.push(`ansi-bg-${state.bg}`);
  if (state.bold) classes.push("ansi-bold");
  if (state.dim) classes.push("ansi-dim");
  if (state.italic) classes.push("ansi-italic");
  if (state.underline) classes.push("ansi-underline");
  return classes.join(" ");
}

// CSI sequences (SGR and the cursor movements that are dropped), OSC sequences, and other lone escapes.
// eslint-disable-next-line no-control-regex
const ESCAPES = /\x1b\[([0-9;?]*)([@-~])|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-_]/g;

/** Follows the SGR codes of `text` without drawing it (output that is dropped). */
function advanceAnsi(text, state) {
  for (const match of text.matchAll(ESCAPES)) if (match[2] === "m") applySgr(state, match[1]);
}

/** Appends `text` to `parent` as text nodes and classed spans, following and updating `state`. */
function appendAnsi(parent, text, state) {
  let last = 0;
  const emit = (segment) => {
    if (!segment) return;
    const classes = ansiClasses(state);
    parent.append(classes ? h("span", { class: classes }, segment) : document.createTextNode(segment));
  };
  for (const match of text.matchAll(ESCAPES)) {
    emit(text.slice(last, match.index));
    if (match[2] === "m") applySgr(state, match[1]);
    last = match.index + match[0].length;
  }
  emit(text.slice(last));
}

// --- live output -------------------------------------------------------------------------------------------------

/** Run output: appended once per animation frame in one fragment, capped at MAX_OUTPUT_LINES lines on the page. */
class OutputView {
  constructor(element) {
    this.element = element;
    this.pending = [];
    this.chunks = [];
    this.lines = 0;
    this.dropped = 0;
    this.states = { stdout: ansiState(), stderr: ansiState() };
    this.scheduled = false;
    this.note = null;
  }

  push(stream, text) {
    this.pending.push([stream, text]);
    if (!this.scheduled) {
      this.scheduled = true;
      requestAnimationFrame(() => this.flush());
    }
  }

  flush() {
    this.scheduled = false;
    const atBottom = this.element.scrollHeight - this.element.scrollTop - this.element.clientHeight < 40;
    const fragment = document.createDocumentFragment();
    for (const [stream, whole] of this.pending) {
      let text = whole;
      let lines = (text.match(/\n/g) || []).length;
      if (lines > MAX_OUTPUT_LINES) {
        // One event alone over the cap: only its tail is drawn (the colours of the rest still carry over).
        let cut = text.length;
        for (let kept = 0; kept <= MAX_OUTPUT_LINES; kept++) cut = text.lastIndexOf("\n", cut - 1);
        advanceAnsi(text.slice(0, cut + 1), this.states[stream]);
        text = text.slice(cut + 1);
        this.dropped += lines - MAX_OUTPUT_LINES;
        lines = MAX_OUTPUT_LINES;
      }
      const span = h("span", { class: stream });
      appendAnsi(span, text, this.states[stream]);
      this.chunks.push({ span, lines });
      this.lines += lines;
      fragment.append(span);
    }
    this.pending = [];
    this.element.append(fragment);
    while (this.lines > MAX_OUTPUT_LINES && this.chunks.length > 1) {
      const oldest = this.chunks.shift();
      oldest.span.remove();
      this.lines -= oldest.lines;
      this.dropped += oldest.lines;
    }
    if (this.dropped) {
      if (!this.note) this.note = h("span", { class: "trimmed" });
      this.note.textContent = `… ${this.dropped} earlier lines not shown (all of them are kept: GET /api/runs/{id}/events)`;
      this.element.prepend(this.note);
    }
    if (atBottom) this.element.scrollTop = this.element.scrollHeight;
  }
}

function describeEvent(event) {
  const data = event.data || {};
  switch (event.type) {
    case "status":
      return [data.status, data.exitCode !== undefined && data.exitCode !== null ? ` exit ${data.exitCode}` : "", data.signal ? ` signal ${data.signal}` : "", data.error ? ` — ${data.error}` : ""].join("");
    case "lease":
      return `${data.status}${data.leaseId ? ` ${data.leaseId}` : ""}${data.policy ? ` (${data.policy})` : ""}${data.provider ? ` on ${data.provider}` : ""}${data.resumed ? ", resumed" : ""}${data.cleanupStatus ? `, cleanup ${data.cleanupStatus}` : ""}`;
    case "workspace":
      return data.phase === "synced"
        ? `synced back: ${data.filesWritten ?? 0} written, ${data.filesDeleted ?? 0} deleted${data.conflicts && data.conflicts.length ? `, ${data.conflicts.length} conflicts` : ""}${data.complete === false ? ", incomplete" : ""}`
        : `${data.phase}${data.cwd ? ` at ${data.cwd}` : ""}${data.inPlace ? " (in place)" : ""}`;
    case "bridge":
      return `${data.method} ${data.path} → ${data.status} in ${data.latencyMs} ms${data.code ? ` (${data.code})` : ""}`;
    case "agent":
      return data.message || "";
    case "error":
      return `${data.code}: ${data.message}`;
    default:
      return JSON.stringify(data);
  }
}

async function runPage(container, runId) {
  let run = await api("GET", `/api/runs/${enc(runId)}`);
  const statusCell = h("span", { id: "run-status" });
  const exitCell = h("span", { id: "run-exit" });
  const errorCell = h("span", { class: "error", id: "run-error" });
  const cancel = h("button", {
    type: "button",
    class: "danger",
    id: "run-cancel",
    onclick: async () => {
      cancel.disabled = true;
      try {
        showRun(await api("POST", `/api/runs/${enc(runId)}/cancel`));
      } catch (error) {
        errorCell.textContent = errorText(error);
        cancel.disabled = false;
      }
    },
  }, "Cancel");
  const showRun = (next) => {
    run = next;
    clear(statusCell).append(badge(run.status));
    statusCell.dataset.status = run.status;
    exitCell.textContent = [
      run.exitCode !== null && run.exitCode !== undefined ? `exit code ${run.exitCode}` : "",
      run.signal ? `signal ${run.signal}` : "",
    ].filter(Boolean).join(", ");
    errorCell.textContent = run.error || "";
    cancel.hidden = TERMINAL_RUN.has(run.status) || !isManager();
  };
  showRun(run);
  const output = h("pre", { id: "output", "aria-live": "off" });
  const timeline = h("ul", { class: "timeline", id: "timeline" });
  container.append(
    h("h1", {}, "Run ", h("code", {}, run.id)),
    h(
      "div",
      { class: "panel run-head" },
      h("code", { id: "run-command-line" }, commandLine(run.command)),
      statusCell,
      exitCell,
      cancel,
      h("span", { class: "muted" }, `created ${when(run.createdAt)}`),
      errorCell,
    ),
    h("div", { class: "run-layout" }, h("div", {}, h("h2", {}, "Output"), output), h("div", {}, h("h2", {}, "Events"), timeline)),
  );
  const view = new OutputView(output);
  let lastSeq = 0;
  let stream = null;
  let finished = false;
  let retry = 0;

  const onEvent = (message) => {
    let event;
    try {
      event = JSON.parse(message.data);
    } catch {
      return;
    }
    // A reconnect replays from the last seq seen; anything older is a duplicate.
    if (event.seq <= lastSeq) return;
    lastSeq = event.seq;
    if (event.type === "stdout" || event.type === "stderr") {
      view.push(event.type, (event.data && event.data.text) || "");
      return;
    }
    timeline.append(
      h("li", { class: `ev-${event.type}`, dataset: { seq: String(event.seq) } },
        h("span", { class: "at" }, when(event.at)), h("span", { class: "kind" }, event.type), describeEvent(event)),
    );
    if (event.type === "status" && TERMINAL_RUN.has(event.data && event.data.status)) {
      finished = true;
      stream && stream.close();
      api("GET", `/api/runs/${enc(runId)}`).then(showRun, () => {});
    } else if (event.type === "status" && event.data) {
      showRun({ ...run, status: event.data.status });
    }
  };

  const open = () => {
    // EventSource cannot send custom headers; the server accepts the session cookie on this GET stream only.
    stream = new EventSource(`/api/runs/${enc(runId)}/events?after=${lastSeq}`);
    for (const type of ["status", "lease", "workspace", "stdout", "stderr", "agent", "bridge", "error"]) {
      stream.addEventListener(type, onEvent);
    }
    stream.addEventListener("open", () => {
      retry = 0;
    });
    stream.onerror = () => {
      // The server ends the stream after the final event; EventSource would reconnect from the start, so it is
      // reopened by hand from the last seq seen, with a growing pause.
      stream.close();
      if (finished || !session) return;
      retry = Math.min(retry + 1, 10);
      reopen = setTimeout(open, 500 * retry);
    };
  };
  let reopen = 0;
  open();
  onLeave(() => {
    finished = true;
    clearTimeout(reopen);
    stream && stream.close();
  });
}

// --- start -------------------------------------------------------------------------------------------------------

async function start() {
  window.addEventListener("hashchange", () => route());
  try {
    await loadSession();
  } catch {
    session = null;
  }
  renderChrome();
  if (session) route();
  else renderSignIn();
}

start();
