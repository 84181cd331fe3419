// Parley load client: many WebSocket connections, paced senders, per-delivery latency.
//
// Build (offline, Debian packages golang-go and golang-github-gorilla-websocket-dev):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o build/loadclient loadtest/client/main.go
//
// Three protocols: "parley" (ws://HOST/ws/?token=T, hello, join, send/ack/message frames),
// "tutorial" (the Channels tutorial: ws://HOST/ws/chat/<room>/, {"message": ...} both ways) and
// "hub" (the O(1) pub/sub hub: the tutorial's frames at ws://HOST/ws/hub/<room>/).
//
// Three modes:
//
//	fanout   connect -sockets sockets in rooms of -room-size, then offer each load of -steps
//	         (deliveries/s at members) for -step-seconds, wait up to -drain-seconds for the step's
//	         deliveries, and stop at the first step failing -max-p99-ms / -min-ratio (then refine
//	         between the last passing and the first failing load -refine times).
//	idle     connect -sockets sockets (after -warm warm-up sockets), hold them open while the
//	         caller measures the server's memory; driven by lines on stdin.
//	sockets  (parley) -warm warm-up sockets, then -sockets more: connect (up to hello), join one
//	         room each, close them all, reconnect each and `resume` its room from the last seq it
//	         has (up to `resumed`); phases timed, driven by lines on stdin.
//
// Every result is one JSON object per line on stdout; progress goes to stderr.
//
// A message body is "~<step>:<send time ns>:<padding>": latency is the receive time minus the
// send time embedded in the body (same machine, same clock); the step index attributes late
// deliveries to the step that sent them.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math"
	"math/bits"
	"math/rand"
	"net"
	"net/http"
	"net/url"
	"os"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/gorilla/websocket"
)

const maxSteps = 64

// ---- configuration ---------------------------------------------------------------------------

type config struct {
	mode        string
	proto       string
	urls        []string
	tokens      []string
	roomIDs     []int64
	sockets     int
	roomSize    int
	senders     int
	concurrency int
	steps       []float64
	stepSec     float64
	drainSec    float64
	maxP99      float64
	minRatio    float64
	refine      int
	bodyBytes   int
	warm        int
	timeout     float64
	pids        map[string]int
	pidOrder    []string
	rootPid     int
	noisePct    float64
	runTag      string
}

func parseFlags() *config {
	c := &config{}
	urls := flag.String("urls", "ws://127.0.0.1:8000", "comma-separated base URLs (ws://host:port), sockets spread round-robin")
	tokensFile := flag.String("tokens", "", "parley: file with one API token per line (one per socket, in socket order)")
	roomsFile := flag.String("room-ids", "", "parley: file with one room id per line (room index order)")
	steps := flag.String("steps", "1000,2000,4000", "offered deliveries/s per step, comma-separated")
	pids := flag.String("pids", "", "name=pid,... processes whose CPU use is reported per step")
	procs := flag.Int("procs", 1, "GOMAXPROCS for this client")
	flag.StringVar(&c.mode, "mode", "fanout", "fanout | idle | sockets")
	flag.StringVar(&c.proto, "proto", "parley", "parley | tutorial | hub")
	flag.IntVar(&c.sockets, "sockets", 2000, "sockets")
	flag.IntVar(&c.roomSize, "room-size", 20, "sockets per room")
	flag.IntVar(&c.senders, "senders", 1, "senders per room (the room's first sockets)")
	flag.IntVar(&c.concurrency, "concurrency", 50, "concurrent handshakes (and joins)")
	flag.Float64Var(&c.stepSec, "step-seconds", 6, "seconds of sending per step")
	flag.Float64Var(&c.drainSec, "drain-seconds", 3, "seconds to wait for a step's deliveries after its last send")
	flag.Float64Var(&c.maxP99, "max-p99-ms", 100, "a step passes with p99 at most this")
	flag.Float64Var(&c.minRatio, "min-ratio", 0.999, "a step passes with at least this delivery ratio")
	flag.IntVar(&c.refine, "refine", 0, "extra steps bisecting between the last pass and the first failure")
	flag.IntVar(&c.bodyBytes, "body-bytes", 100, "message body size")
	flag.IntVar(&c.warm, "warm", 20, "idle, sockets: warm-up sockets connected before the memory baseline")
	flag.IntVar(&c.rootPid, "root-pid", 0, "pid whose descendants are this benchmark (CPU use of the rest is reported as other load)")
	flag.Float64Var(&c.noisePct, "noise-retry-pct", 25, "retry a failed step once when other programs used more than this % of a core (0: never)")
	flag.Float64Var(&c.timeout, "timeout", 900, "hard limit on this process's run time, seconds")
	flag.Parse()
	runtime.GOMAXPROCS(*procs)
	for _, u := range strings.Split(*urls, ",") {
		if u = strings.TrimSpace(u); u != "" {
			c.urls = append(c.urls, strings.TrimRight(u, "/"))
		}
	}
	for _, s := range strings.Split(*steps, ",") {
		if s = strings.TrimSpace(s); s != "" {
			v, err := strconv.ParseFloat(s, 64)
			if err != nil {
				fatal("bad -steps value %q", s)
			}
			c.steps = append(c.steps, v)
		}
	}
	c.pids = map[string]int{}
	for _, kv := range strings.Split(*pids, ",") {
		if name, pid, ok := strings.Cut(kv, "="); ok {
			p, err := strconv.Atoi(pid)
			if err == nil {
				c.pids[name] = p
				c.pidOrder = append(c.pidOrder, name)
			}
		}
	}
	if c.proto == "parley" {
		c.tokens = readLines(*tokensFile)
		for _, line := range readLines(*roomsFile) {
			id, err := strconv.ParseInt(line, 10, 64)
			if err != nil {
				fatal("bad room id %q", line)
			}
			c.roomIDs = append(c.roomIDs, id)
		}
		if len(c.tokens) < c.totalSockets() {
			fatal("%d tokens for %d sockets", len(c.tokens), c.totalSockets())
		}
		if rooms := (c.totalSockets() + c.roomSize - 1) / c.roomSize; len(c.roomIDs) < rooms {
			fatal("%d room ids for %d rooms", len(c.roomIDs), rooms)
		}
	} else if c.proto != "tutorial" && c.proto != "hub" {
		fatal("unknown -proto %q", c.proto)
	}
	if c.mode == "sockets" && c.proto != "parley" {
		fatal("-mode sockets needs -proto parley (join and resume are Parley's)")
	}
	if c.senders < 1 || c.senders > c.roomSize {
		fatal("-senders must be 1..room-size")
	}
	if c.bodyBytes < 48 {
		c.bodyBytes = 48
	}
	c.runTag = strconv.FormatInt(time.Now().UnixNano()%1e9, 36) + strconv.Itoa(rand.Intn(1000))
	return c
}

// totalSockets: in sockets mode the -warm warm-up sockets come on top of -sockets (they are
// not timed); in idle mode they are the first of -sockets.
func (c *config) totalSockets() int {
	if c.mode == "sockets" {
		return c.warm + c.sockets
	}
	return c.sockets
}

func readLines(path string) []string {
	if path == "" {
		return nil
	}
	data, err := os.ReadFile(path)
	if err != nil {
		fatal("read %s: %v", path, err)
	}
	var out []string
	for _, line := range strings.Split(string(data), "\n") {
		if line = strings.TrimSpace(line); line != "" {
			out = append(out, line)
		}
	}
	return out
}

// ---- output ----------------------------------------------------------------------------------

var outMu sync.Mutex

func emit(v map[string]any) {
	data, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	outMu.Lock()
	os.Stdout.Write(append(data, '\n'))
	outMu.Unlock()
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "[client %s] %s\n", time.Now().Format("15:04:05.000"), fmt.Sprintf(format, args...))
}

func fatal(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	emit(map[string]any{"event": "fatal", "error": msg})
	fmt.Fprintln(os.Stderr, "loadclient:", msg)
	os.Exit(2)
}

// ---- error tallies ---------------------------------------------------------------------------

type tally struct {
	mu     sync.Mutex
	counts map[string]int
}

func newTally() *tally { return &tally{counts: map[string]int{}} }

func (t *tally) add(key string) {
	if len(key) > 160 {
		key = key[:160]
	}
	t.mu.Lock()
	if _, ok := t.counts[key]; ok || len(t.counts) < 30 {
		t.counts[key]++
	} else {
		t.counts["(other)"]++
	}
	t.mu.Unlock()
}

func (t *tally) snapshot() map[string]int {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make(map[string]int, len(t.counts))
	for k, v := range t.counts {
		out[k] = v
	}
	return out
}

func (t *tally) total() int {
	n := 0
	for _, v := range t.snapshot() {
		n += v
	}
	return n
}

// ---- latency histogram (log-linear, ~1.5 % resolution, lock-free) -----------------------------

const histBuckets = 128 + 40*64

type hist struct {
	counts [histBuckets]uint64
	max    int64
	total  uint64
}

func bucketOf(us int64) int {
	if us < 0 {
		us = 0
	}
	if us < 128 {
		return int(us)
	}
	e := bits.Len64(uint64(us)) - 7
	i := 128 + (e-1)*64 + int(us>>uint(e)) - 64
	if i >= histBuckets {
		i = histBuckets - 1
	}
	return i
}

func bucketValue(i int) float64 { // upper edge of bucket i, microseconds
	if i < 128 {
		return float64(i + 1)
	}
	e := (i-128)/64 + 1
	m := (i-128)%64 + 64
	return float64(int64(m+1) << uint(e))
}

func (h *hist) record(ns int64) {
	us := ns / 1000
	atomic.AddUint64(&h.counts[bucketOf(us)], 1)
	atomic.AddUint64(&h.total, 1)
	for {
		old := atomic.LoadInt64(&h.max)
		if us <= old || atomic.CompareAndSwapInt64(&h.max, old, us) {
			break
		}
	}
}

// percentile in milliseconds; -1 when empty.
func (h *hist) percentile(p float64) float64 {
	total := atomic.LoadUint64(&h.total)
	if total == 0 {
		return -1
	}
	rank := uint64(math.Ceil(p / 100 * float64(total)))
	if rank < 1 {
		rank = 1
	}
	var seen uint64
	for i := 0; i < histBuckets; i++ {
		seen += atomic.LoadUint64(&h.counts[i])
		if seen >= rank {
			v := bucketValue(i)
			if mx := float64(atomic.LoadInt64(&h.max)); v > mx {
				v = mx
			}
			return v / 1000
		}
	}
	return float64(atomic.LoadInt64(&h.max)) / 1000
}

// ---- per-step counters -----------------------------------------------------------------------

type stepStats struct {
	offered  float64
	sent     int64
	expected int64
	received int64
	late     int64
	skipped  int64
	sendErrs int64
	closed   int32 // 1 once the step's window is over: later deliveries count as late
	lat      hist
	lag      hist
}

var (
	stepsMu sync.Mutex
	steps   [maxSteps]*stepStats

	acks      int64
	seqGaps   int64
	seqDups   int64
	reloads   int64
	otherMsgs int64
	serverErr = newTally() // error frames by code
	closes    = newTally() // connections closed by the server (or failed) after setup
	shutdown  int32
)

// ---- connections -----------------------------------------------------------------------------

type client struct {
	idx       int
	room      int
	roomID    int64
	members   int64
	ws        *websocket.Conn
	sendCh    chan sendItem
	replyCh   chan string // the awaited answer: "" when it came, else the error
	awaiting  int32       // awaitJoined / awaitResumed while a request waits for its answer
	lastSeq   int64       // seq of the last message received (0: none yet)
	joinedSeq int64       // the room's last_seq in the last `joined` frame
	open      int32
}

// What a request waits for (client.awaiting).
const (
	awaitNothing int32 = iota
	awaitJoined
	awaitResumed
)

type sendItem struct {
	step      int
	scheduled int64
}

var dialer = &websocket.Dialer{
	HandshakeTimeout: 30 * time.Second,
	ReadBufferSize:   4096,
	WriteBufferSize:  4096,
	NetDialContext: (&net.Dialer{
		Timeout: 30 * time.Second,
	}).DialContext,
}

func (c *config) socketURL(i int) string {
	base := c.urls[i%len(c.urls)]
	if c.proto == "parley" {
		return base + "/ws/?token=" + url.QueryEscape(c.tokens[i])
	}
	if c.proto == "hub" {
		return fmt.Sprintf("%s/ws/hub/r%d/", base, i/c.roomSize)
	}
	return fmt.Sprintf("%s/ws/chat/r%d/", base, i/c.roomSize)
}

func classifyDialErr(err error, resp *http.Response) string {
	if resp != nil {
		return fmt.Sprintf("handshake HTTP %d", resp.StatusCode)
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return "timeout: " + err.Error()
	}
	s := err.Error()
	if i := strings.Index(s, "127.0.0.1:"); i >= 0 { // drop ephemeral ports from the key
		s = s[:i] + "127.0.0.1" + strings.TrimLeft(s[i+10:], "0123456789")
	}
	return s
}

// connect dials one socket; for Parley it also waits for the hello frame.
func (cfg *config) connect(c *client) error {
	ws, resp, err := dialer.Dial(cfg.socketURL(c.idx), nil)
	if err != nil {
		return errors.New(classifyDialErr(err, resp))
	}
	if resp != nil && resp.Body != nil {
		resp.Body.Close()
	}
	if cfg.proto == "parley" {
		ws.SetReadDeadline(time.Now().Add(30 * time.Second))
		for {
			_, data, err := ws.ReadMessage()
			if err != nil {
				ws.Close()
				return fmt.Errorf("no hello: %s", closeText(err))
			}
			if bytes.HasPrefix(data, []byte(`{"type":"hello"`)) {
				break
			}
			if bytes.HasPrefix(data, []byte(`{"type":"error"`)) {
				ws.Close()
				return fmt.Errorf("error before hello: %s", frameCode(data))
			}
		}
		ws.SetReadDeadline(time.Time{})
	}
	c.ws = ws
	atomic.StoreInt32(&c.open, 1)
	return nil
}

func closeText(err error) string {
	var ce *websocket.CloseError
	if errors.As(err, &ce) {
		return fmt.Sprintf("close %d %s", ce.Code, ce.Text)
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return "read timeout"
	}
	s := err.Error()
	if strings.Contains(s, "connection reset") {
		return "connection reset"
	}
	if strings.Contains(s, "EOF") {
		return "EOF (no close frame)"
	}
	return s
}

func frameCode(data []byte) string {
	i := bytes.Index(data, []byte(`"code":"`))
	if i < 0 {
		return "?"
	}
	rest := data[i+8:]
	j := bytes.IndexByte(rest, '"')
	if j < 0 {
		return "?"
	}
	return string(rest[:j])
}

// parseInt reads a decimal number at the start of b; returns the value and the bytes used.
func parseInt(b []byte) (int64, int) {
	var v int64
	n := 0
	for n < len(b) && b[n] >= '0' && b[n] <= '9' {
		v = v*10 + int64(b[n]-'0')
		n++
	}
	return v, n
}

var (
	bodyMarker    = []byte(`"~`)
	seqMarker     = []byte(`"seq":`)
	lastSeqMarker = []byte(`"last_seq":`)
	pJoined       = []byte(`{"type":"joined"`)
	pAck          = []byte(`{"type":"ack"`)
	pError        = []byte(`{"type":"error"`)
	pReload       = []byte(`{"type":"reload"`)
	pResumed      = []byte(`{"type":"resumed"`)
	pMessage      = []byte(`{"type":"message"`)
)

func (cfg *config) reader(c *client) {
	var buf bytes.Buffer
	buf.Grow(1024)
	for {
		_, r, err := c.ws.NextReader()
		if err != nil {
			// Still open: the server (or the network) closed it, not this client.
			if atomic.SwapInt32(&c.open, 0) == 1 && atomic.LoadInt32(&shutdown) == 0 {
				closes.add(closeText(err))
				c.answer(awaitNothing, "closed: "+closeText(err))
			}
			return
		}
		buf.Reset()
		if _, err := buf.ReadFrom(r); err != nil {
			continue
		}
		now := time.Now().UnixNano()
		b := buf.Bytes()
		if i := bytes.Index(b, bodyMarker); i >= 0 {
			step, n := parseInt(b[i+2:])
			rest := b[i+2+n:]
			if n == 0 || len(rest) < 2 || rest[0] != ':' || step >= maxSteps {
				atomic.AddInt64(&otherMsgs, 1)
				continue
			}
			ts, m := parseInt(rest[1:])
			if m == 0 {
				atomic.AddInt64(&otherMsgs, 1)
				continue
			}
			st := steps[step]
			if st == nil {
				continue
			}
			if atomic.LoadInt32(&st.closed) == 1 {
				atomic.AddInt64(&st.late, 1)
			} else {
				atomic.AddInt64(&st.received, 1)
				st.lat.record(now - ts)
			}
			if cfg.proto == "parley" {
				if j := bytes.Index(b, seqMarker); j >= 0 {
					seq, k := parseInt(b[j+6:])
					if k > 0 {
						last := c.lastSeq
						if last != 0 && seq <= last {
							atomic.AddInt64(&seqDups, 1)
						} else {
							if last != 0 && seq > last+1 {
								atomic.AddInt64(&seqGaps, 1)
							}
							c.lastSeq = seq
						}
					}
				}
			}
			continue
		}
		if cfg.proto != "parley" {
			atomic.AddInt64(&otherMsgs, 1)
			continue
		}
		switch {
		case bytes.HasPrefix(b, pAck):
			atomic.AddInt64(&acks, 1)
		case bytes.HasPrefix(b, pJoined):
			if j := bytes.Index(b, lastSeqMarker); j >= 0 {
				c.joinedSeq, _ = parseInt(b[j+len(lastSeqMarker):])
			}
			c.answer(awaitJoined, "")
		case bytes.HasPrefix(b, pError):
			code := frameCode(b)
			serverErr.add(code)
			c.answer(awaitNothing, "error "+code)
		case bytes.HasPrefix(b, pResumed):
			if !c.answer(awaitResumed, "") {
				atomic.AddInt64(&reloads, 1) // a resumed frame nobody asked for
			}
		case bytes.HasPrefix(b, pReload):
			atomic.AddInt64(&reloads, 1)
			c.answer(awaitResumed, "reload (too much missed)")
		case bytes.HasPrefix(b, pMessage):
			atomic.AddInt64(&otherMsgs, 1) // a message not sent by this run
		}
	}
}

// answer hands the reader's news to a waiting request: a frame of the kind it waits for
// (`kind`), or, with awaitNothing, an error or close that ends any wait. Reports whether a
// request was waiting for it.
func (c *client) answer(kind int32, res string) bool {
	waiting := atomic.LoadInt32(&c.awaiting)
	if waiting == awaitNothing || (kind != awaitNothing && kind != waiting) {
		return false
	}
	select {
	case c.replyCh <- res:
	default:
	}
	return true
}

// request writes one frame and waits for the answer the reader goroutine hands over.
func (c *client) request(kind int32, name, frame string) error {
	atomic.StoreInt32(&c.awaiting, kind)
	defer atomic.StoreInt32(&c.awaiting, awaitNothing)
	c.ws.SetWriteDeadline(time.Now().Add(30 * time.Second))
	if err := c.ws.WriteMessage(websocket.TextMessage, []byte(frame)); err != nil {
		return fmt.Errorf("%s write: %s", name, closeText(err))
	}
	c.ws.SetWriteDeadline(time.Time{})
	select {
	case res := <-c.replyCh:
		if res != "" {
			return fmt.Errorf("%s: %s", name, res)
		}
		return nil
	case <-time.After(30 * time.Second):
		return fmt.Errorf("%s: no answer within 30s", name)
	}
}

// joinRoom sends Parley's join frame and waits for `joined`.
func (cfg *config) joinRoom(c *client) error {
	return c.request(awaitJoined, "join", fmt.Sprintf(`{"type":"join","room":%d}`, c.roomID))
}

// resumeRoom sends `resume` for the client's room from the last seq it has, and waits for
// `resumed` (the server sends joined, the missed messages, then resumed).
func (cfg *config) resumeRoom(c *client) error {
	from := c.joinedSeq
	if c.lastSeq > from {
		from = c.lastSeq
	}
	return c.request(awaitResumed, "resume", fmt.Sprintf(`{"type":"resume","rooms":{"%d":%d}}`, c.roomID, from))
}

type phaseResult struct {
	ok      int
	errs    map[string]int
	seconds float64
}

func (r phaseResult) rate() float64 { return float64(r.ok) / math.Max(r.seconds, 1e-9) }

// into adds the phase's figures to m: <done> (how many succeeded), <prefix>_errors, _seconds,
// _rate and _error_kinds, out of `attempted`.
func (r phaseResult) into(m map[string]any, prefix, done string, attempted int) map[string]any {
	m[done] = r.ok
	m[prefix+"_errors"] = attempted - r.ok
	m[prefix+"_seconds"] = round(r.seconds, 3)
	m[prefix+"_rate"] = round(r.rate(), 1)
	m[prefix+"_error_kinds"] = r.errs
	return m
}

// runPhase runs fn for every client with at most `concurrency` in flight.
func runPhase(clients []*client, concurrency int, fn func(*client) error) ([]*client, phaseResult) {
	start := time.Now()
	errs := newTally()
	var okMu sync.Mutex
	var ok []*client
	work := make(chan *client)
	var wg sync.WaitGroup
	for w := 0; w < concurrency; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for c := range work {
				if err := fn(c); err != nil {
					errs.add(err.Error())
					continue
				}
				okMu.Lock()
				ok = append(ok, c)
				okMu.Unlock()
			}
		}()
	}
	for _, c := range clients {
		work <- c
	}
	close(work)
	wg.Wait()
	sort.Slice(ok, func(i, j int) bool { return ok[i].idx < ok[j].idx })
	return ok, phaseResult{ok: len(ok), errs: errs.snapshot(), seconds: time.Since(start).Seconds()}
}

func (cfg *config) makeClients(from, to int) []*client {
	out := make([]*client, 0, to-from)
	for i := from; i < to; i++ {
		c := &client{idx: i, room: i / cfg.roomSize, replyCh: make(chan string, 1)}
		if cfg.proto == "parley" && c.room < len(cfg.roomIDs) {
			c.roomID = cfg.roomIDs[c.room]
		}
		out = append(out, c)
	}
	return out
}

// connectAll connects (and for Parley, joins when join is set) the given clients.
func (cfg *config) connectAll(clients []*client, join bool, label string) ([]*client, map[string]any) {
	logf("%s: connecting %d sockets, %d at a time", label, len(clients), cfg.concurrency)
	connected, cr := runPhase(clients, cfg.concurrency, func(c *client) error {
		if err := cfg.connect(c); err != nil {
			return err
		}
		go cfg.reader(c)
		return nil
	})
	res := cr.into(map[string]any{"attempted": len(clients)}, "connect", "connected", len(clients))
	logf("%s: %d/%d connected in %.1fs (%.0f/s)", label, cr.ok, len(clients), cr.seconds, cr.rate())
	ready := connected
	if join && cfg.proto == "parley" {
		var jr phaseResult
		ready, jr = runPhase(connected, cfg.concurrency, cfg.joinRoom)
		jr.into(res, "join", "joined", len(connected))
		logf("%s: %d/%d joined in %.1fs", label, jr.ok, len(connected), jr.seconds)
	}
	res["ready"] = len(ready)
	return ready, res
}

func round(v float64, digits int) float64 {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return -1
	}
	p := math.Pow(10, float64(digits))
	return math.Round(v*p) / p
}

// ---- CPU accounting --------------------------------------------------------------------------

func procTicks(pid int) (int64, bool) {
	path := "/proc/self/stat"
	if pid > 0 {
		path = fmt.Sprintf("/proc/%d/stat", pid)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return 0, false
	}
	i := bytes.LastIndexByte(data, ')')
	if i < 0 {
		return 0, false
	}
	f := strings.Fields(string(data[i+1:]))
	if len(f) < 13 {
		return 0, false
	}
	u, _ := strconv.ParseInt(f[11], 10, 64)
	s, _ := strconv.ParseInt(f[12], 10, 64)
	return u + s, true
}

func machineTicks() (busy, total int64) {
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0
	}
	line := strings.SplitN(string(data), "\n", 2)[0]
	f := strings.Fields(line)
	for i, v := range f[1:] {
		n, _ := strconv.ParseInt(v, 10, 64)
		if i >= 8 { // guest time is already in user
			break
		}
		total += n
		if i != 3 && i != 4 { // idle, iowait
			busy += n
		}
	}
	return busy, total
}

type procInfo struct {
	ticks int64
	ppid  int
	comm  string
}

type cpuSample struct {
	at    time.Time
	procs map[string]int64
	all   map[int]procInfo // every process on the machine
	busy  int64
	total int64
}

func readAllProcs() map[int]procInfo {
	out := map[int]procInfo{}
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return out
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		i, j := bytes.IndexByte(data, '('), bytes.LastIndexByte(data, ')')
		if i < 0 || j < i {
			continue
		}
		f := strings.Fields(string(data[j+1:]))
		if len(f) < 13 {
			continue
		}
		ppid, _ := strconv.Atoi(f[1])
		u, _ := strconv.ParseInt(f[11], 10, 64)
		st, _ := strconv.ParseInt(f[12], 10, 64)
		out[pid] = procInfo{ticks: u + st, ppid: ppid, comm: string(data[i+1 : j])}
	}
	return out
}

func (cfg *config) sampleCPU() cpuSample {
	s := cpuSample{at: time.Now(), procs: map[string]int64{}}
	for name, pid := range cfg.pids {
		if t, ok := procTicks(pid); ok {
			s.procs[name] = t
		}
	}
	if t, ok := procTicks(0); ok {
		s.procs["loadclient"] = t
	}
	s.all = readAllProcs()
	s.busy, s.total = machineTicks()
	return s
}

// cpuPercent: per process, % of one core (100 = one core busy); machine: % of all cores.
func cpuPercent(a, b cpuSample) map[string]any {
	const hz = 100.0 // USER_HZ on Linux
	secs := b.at.Sub(a.at).Seconds()
	out := map[string]any{}
	for name, t := range b.procs {
		if t0, ok := a.procs[name]; ok && secs > 0 {
			out[name] = round(float64(t-t0)/hz/secs*100, 1)
		}
	}
	if b.total > a.total {
		out["machine_all_cores"] = round(float64(b.busy-a.busy)/float64(b.total-a.total)*100, 1)
	}
	return out
}

// cpuGroups splits the machine's CPU use between a and b (% of one core) into: "bench" (the
// processes under -root-pid: servers, Redis, this client), "postgres", "kernel" (threads), and
// "other": load on the machine that is not this benchmark's. otherTop names the busiest of those.
func (cfg *config) cpuGroups(a, b cpuSample) (map[string]float64, map[string]float64) {
	const hz = 100.0
	secs := b.at.Sub(a.at).Seconds()
	groups := map[string]float64{"bench": 0, "postgres": 0, "kernel": 0, "other": 0}
	others := map[string]float64{}
	if secs <= 0 {
		return groups, others
	}
	memo := map[int]bool{}
	var ours func(pid, depth int) bool
	ours = func(pid, depth int) bool {
		if v, ok := memo[pid]; ok {
			return v
		}
		res := false
		if pid == cfg.rootPid || pid == os.Getpid() {
			res = true
		} else if p, ok := b.all[pid]; ok && p.ppid > 1 && depth < 64 {
			res = ours(p.ppid, depth+1)
		}
		memo[pid] = res
		return res
	}
	for pid, p := range b.all {
		d := p.ticks - a.all[pid].ticks
		if d <= 0 {
			continue
		}
		pct := float64(d) / hz / secs * 100
		switch {
		case cfg.rootPid > 0 && ours(pid, 0):
			groups["bench"] += pct
		case strings.HasPrefix(p.comm, "postgres"):
			groups["postgres"] += pct
		case pid == 2 || p.ppid == 2:
			groups["kernel"] += pct
		default:
			groups["other"] += pct
			others[p.comm] += pct
		}
	}
	for k, v := range groups {
		groups[k] = round(v, 1)
	}
	top := map[string]float64{}
	type kv struct {
		name string
		pct  float64
	}
	var list []kv
	for k, v := range others {
		list = append(list, kv{k, v})
	}
	sort.Slice(list, func(i, j int) bool { return list[i].pct > list[j].pct })
	for i := 0; i < len(list) && i < 4; i++ {
		if list[i].pct >= 2 {
			top[list[i].name] = round(list[i].pct, 1)
		}
	}
	return groups, top
}

// ---- fanout ----------------------------------------------------------------------------------

func (cfg *config) sender(c *client, wg *sync.WaitGroup) {
	defer wg.Done()
	pad := strings.Repeat("x", cfg.bodyBytes)
	var msgBuf []byte
	n := 0
	for item := range c.sendCh {
		st := steps[item.step]
		ts := time.Now().UnixNano()
		body := make([]byte, 0, cfg.bodyBytes)
		body = append(body, '~')
		body = strconv.AppendInt(body, int64(item.step), 10)
		body = append(body, ':')
		body = strconv.AppendInt(body, ts, 10)
		body = append(body, ':')
		body = append(body, pad[:cfg.bodyBytes-len(body)]...)
		msgBuf = msgBuf[:0]
		if cfg.proto == "parley" {
			msgBuf = append(msgBuf, `{"type":"send","room":`...)
			msgBuf = strconv.AppendInt(msgBuf, c.roomID, 10)
			msgBuf = append(msgBuf, `,"body":"`...)
			msgBuf = append(msgBuf, body...)
			msgBuf = append(msgBuf, `","client_msg_id":"`...)
			msgBuf = append(msgBuf, cfg.runTag...)
			msgBuf = append(msgBuf, '-')
			msgBuf = strconv.AppendInt(msgBuf, int64(c.idx), 10)
			msgBuf = append(msgBuf, '-')
			msgBuf = strconv.AppendInt(msgBuf, int64(n), 10)
			msgBuf = append(msgBuf, `"}`...)
		} else {
			msgBuf = append(msgBuf, `{"message":"`...)
			msgBuf = append(msgBuf, body...)
			msgBuf = append(msgBuf, `"}`...)
		}
		n++
		if atomic.LoadInt32(&c.open) == 0 {
			atomic.AddInt64(&st.sendErrs, 1)
			continue
		}
		c.ws.SetWriteDeadline(time.Now().Add(10 * time.Second))
		if err := c.ws.WriteMessage(websocket.TextMessage, msgBuf); err != nil {
			atomic.AddInt64(&st.sendErrs, 1)
			continue
		}
		// Counted after the write: expected deliveries are those of messages really sent.
		atomic.AddInt64(&st.expected, c.members)
		atomic.AddInt64(&st.sent, 1)
		st.lag.record(ts - item.scheduled)
	}
}

func roundSig(v float64, digits int) float64 {
	if v <= 0 {
		return 0
	}
	p := math.Pow(10, float64(digits)-math.Ceil(math.Log10(v)))
	return math.Round(v*p) / p
}

func (cfg *config) runStep(idx int, offered float64, senders []*client, msgsPerDelivery float64, extra map[string]any) map[string]any {
	st := &stepStats{offered: offered}
	stepsMu.Lock()
	steps[idx] = st
	stepsMu.Unlock()
	acks0, gaps0, dups0, rel0 := atomic.LoadInt64(&acks), atomic.LoadInt64(&seqGaps), atomic.LoadInt64(&seqDups), atomic.LoadInt64(&reloads)
	errs0, closes0 := serverErr.total(), closes.total()
	cpu0 := cfg.sampleCPU()

	rate := offered * msgsPerDelivery // messages per second, all senders together
	dur := time.Duration(cfg.stepSec * float64(time.Second))
	start := time.Now()
	startNs := start.UnixNano()
	var issued int64
	for {
		elapsed := time.Since(start)
		if elapsed >= dur {
			break
		}
		due := int64(rate * elapsed.Seconds())
		for ; issued < due; issued++ {
			s := senders[issued%int64(len(senders))]
			item := sendItem{step: idx, scheduled: startNs + int64(float64(issued)/rate*1e9)}
			select {
			case s.sendCh <- item:
			default:
				atomic.AddInt64(&st.skipped, 1) // that sender's socket is not taking writes
			}
		}
		time.Sleep(time.Millisecond)
	}
	sendSecs := time.Since(start).Seconds()
	// Drain: until every issued message is written and every expected delivery arrived.
	deadline := time.Now().Add(time.Duration(cfg.drainSec * float64(time.Second)))
	for time.Now().Before(deadline) {
		pending := issued - atomic.LoadInt64(&st.skipped) - atomic.LoadInt64(&st.sent) - atomic.LoadInt64(&st.sendErrs)
		if pending <= 0 && atomic.LoadInt64(&st.received) >= atomic.LoadInt64(&st.expected) {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	atomic.StoreInt32(&st.closed, 1)
	windowSecs := time.Since(start).Seconds()
	cpu1 := cfg.sampleCPU()
	groups, otherTop := cfg.cpuGroups(cpu0, cpu1)

	expected := atomic.LoadInt64(&st.expected)
	received := atomic.LoadInt64(&st.received)
	ratio := 1.0
	if expected > 0 {
		ratio = float64(received) / float64(expected)
	}
	p99 := st.lat.percentile(99)
	pass := expected > 0 && ratio >= cfg.minRatio && p99 >= 0 && p99 <= cfg.maxP99
	res := map[string]any{
		"event":                    "step",
		"step":                     idx,
		"offered_deliveries_per_s": offered,
		"offered_messages_per_s":   round(rate, 2),
		"send_seconds":             round(sendSecs, 3),
		"window_seconds":           round(windowSecs, 3),
		"issued":                   issued,
		"sent":                     atomic.LoadInt64(&st.sent),
		"skipped":                  atomic.LoadInt64(&st.skipped),
		"send_errors":              atomic.LoadInt64(&st.sendErrs),
		"expected":                 expected,
		"received":                 received,
		"delivery_ratio":           round(ratio, 5),
		"delivered_per_s":          round(float64(received)/sendSecs, 1),
		"p50_ms":                   round(st.lat.percentile(50), 2),
		"p95_ms":                   round(st.lat.percentile(95), 2),
		"p99_ms":                   round(p99, 2),
		"max_ms":                   round(float64(atomic.LoadInt64(&st.lat.max))/1000, 2),
		"send_lag_p99_ms":          round(st.lag.percentile(99), 2),
		"acks":                     atomic.LoadInt64(&acks) - acks0,
		"server_errors":            serverErr.total() - errs0,
		"server_closes":            closes.total() - closes0,
		"seq_gaps":                 atomic.LoadInt64(&seqGaps) - gaps0,
		"seq_dups":                 atomic.LoadInt64(&seqDups) - dups0,
		"reloads":                  atomic.LoadInt64(&reloads) - rel0,
		"cpu_pct":                  cpuPercent(cpu0, cpu1),
		"cpu_groups":               groups,
		"other_load_top":           otherTop,
		"pass":                     pass,
	}
	for k, v := range extra {
		res[k] = v
	}
	emit(res)
	logf("step %d: offered %.0f/s delivered %.0f/s ratio %.4f p50 %.1fms p99 %.1fms %s",
		idx, offered, float64(received)/sendSecs, ratio, st.lat.percentile(50), p99, map[bool]string{true: "PASS", false: "FAIL"}[pass])
	return res
}

// waitQuiet waits until no deliveries of any step arrived for `quiet`, at most `limit`; it
// returns the seconds waited and whether deliveries had stopped.
func waitQuiet(quiet, limit time.Duration) (float64, bool) {
	start := time.Now()
	count := func() int64 {
		var n int64
		for _, st := range steps {
			if st != nil {
				n += atomic.LoadInt64(&st.received) + atomic.LoadInt64(&st.late)
			}
		}
		return n
	}
	last, lastChange := count(), time.Now()
	for time.Since(start) < limit {
		time.Sleep(50 * time.Millisecond)
		if n := count(); n != last {
			last, lastChange = n, time.Now()
		} else if time.Since(lastChange) >= quiet {
			return time.Since(start).Seconds(), true
		}
	}
	return time.Since(start).Seconds(), false
}

func (cfg *config) fanout() {
	clients := cfg.makeClients(0, cfg.sockets)
	ready, setup := cfg.connectAll(clients, true, "fanout")
	setup["event"] = "setup"
	emit(setup)
	members := map[int]int64{}
	for _, c := range ready {
		members[c.room]++
	}
	var senders []*client
	var wg sync.WaitGroup
	for _, c := range ready {
		c.members = members[c.room]
		if c.idx%cfg.roomSize < cfg.senders {
			c.sendCh = make(chan sendItem, 256)
			senders = append(senders, c)
			wg.Add(1)
			go cfg.sender(c, &wg)
		}
	}
	if len(senders) == 0 {
		fatal("no sender connected")
	}
	// Offered deliveries/s -> messages/s: each message reaches every ready member of its room.
	var sum int64
	for _, s := range senders {
		sum += s.members
	}
	msgsPerDelivery := float64(len(senders)) / float64(sum)
	time.Sleep(500 * time.Millisecond) // let presence frames of the joins settle

	lastPass, firstFail := -1.0, -1.0
	idx := 0
	// run one load; a failure while other programs loaded the machine is retried once.
	run := func(offered float64, refine bool) bool {
		for attempt := 0; attempt < 2 && idx < maxSteps; attempt++ {
			waited := 0.0
			if refine || attempt > 0 {
				waited, _ = waitQuiet(time.Second, 30*time.Second)
			}
			r := cfg.runStep(idx, offered, senders, msgsPerDelivery, map[string]any{
				"refine": refine, "retry": attempt > 0, "recovery_wait_seconds": round(waited, 2),
			})
			idx++
			if r["pass"].(bool) {
				return true
			}
			other := r["cpu_groups"].(map[string]float64)["other"]
			if cfg.noisePct <= 0 || other <= cfg.noisePct {
				return false
			}
			logf("step failed while other programs used %.0f%% of a core; retrying it once", other)
		}
		return false
	}
	for _, offered := range cfg.steps {
		if idx >= maxSteps-2*cfg.refine-2 {
			break
		}
		if run(offered, false) {
			lastPass = offered
			time.Sleep(300 * time.Millisecond)
			continue
		}
		firstFail = offered
		break
	}
	for k := 0; k < cfg.refine && firstFail > 0; k++ {
		lo := math.Max(lastPass, firstFail/4)
		mid := roundSig(math.Sqrt(lo*firstFail), 2)
		if mid <= lastPass || mid >= firstFail {
			break
		}
		logf("refine: trying %.0f/s (between %.0f and %.0f)", mid, lastPass, firstFail)
		if run(mid, true) {
			lastPass = mid
		} else {
			firstFail = mid
		}
	}
	// Deliveries still arriving after their step's window are late, not lost: wait for the
	// stragglers of an overloaded last step (bounded), and say whether they had stopped.
	_, quiet := waitQuiet(time.Second, 30*time.Second)
	late := make([]int64, idx)
	for i := 0; i < idx; i++ {
		late[i] = atomic.LoadInt64(&steps[i].late)
	}
	open := 0
	for _, c := range ready {
		if atomic.LoadInt32(&c.open) == 1 {
			open++
		}
	}
	atomic.StoreInt32(&shutdown, 1)
	for _, s := range senders {
		close(s.sendCh)
	}
	wg.Wait()
	emit(map[string]any{
		"event":              "done",
		"late_by_step":       late,
		"quiet_at_end":       quiet,
		"open_at_end":        open,
		"server_error_kinds": serverErr.snapshot(),
		"server_close_kinds": closes.snapshot(),
		"other_messages":     atomic.LoadInt64(&otherMsgs),
		"acks_total":         atomic.LoadInt64(&acks),
		"steps_run":          idx,
	})
	closeAll(ready)
}

// closeAll sends a normal close frame on every socket, then closes it.
func closeAll(clients []*client) {
	msg := websocket.FormatCloseMessage(websocket.CloseNormalClosure, "")
	for _, c := range clients {
		atomic.StoreInt32(&c.open, 0) // closed by this client: not a server close
		c.ws.WriteControl(websocket.CloseMessage, msg, time.Now().Add(100*time.Millisecond))
	}
	time.Sleep(200 * time.Millisecond)
	for _, c := range clients {
		c.ws.Close()
	}
}

// ---- idle ------------------------------------------------------------------------------------

func (cfg *config) idle() {
	in := bufio.NewScanner(os.Stdin)
	warmN := cfg.warm
	if warmN > cfg.sockets {
		warmN = cfg.sockets
	}
	warm, wres := cfg.connectAll(cfg.makeClients(0, warmN), true, "idle warm-up")
	wres["event"] = "warm"
	emit(wres)
	in.Scan() // the caller has taken its baseline
	rest, res := cfg.connectAll(cfg.makeClients(warmN, cfg.sockets), true, "idle")
	res["event"] = "ready"
	emit(res)
	in.Scan() // the caller has measured
	emitAlive(append(warm, rest...))
}

// emitAlive reports how many of the clients are still open (and what closed the others), then
// closes them all.
func emitAlive(all []*client) {
	open := 0
	for _, c := range all {
		if atomic.LoadInt32(&c.open) == 1 {
			open++
		}
	}
	atomic.StoreInt32(&shutdown, 1)
	emit(map[string]any{
		"event":              "alive",
		"open":               open,
		"server_close_kinds": closes.snapshot(),
		"server_error_kinds": serverErr.snapshot(),
	})
	closeAll(all)
}

// ---- sockets: connect, join, reconnect and resume ----------------------------------------------

// socketPhases times Parley's socket phases on -sockets sockets after -warm warm-up ones (which stay
// open throughout and are not timed). Between phases it waits for a line on stdin, so that the
// caller can read the server's memory or let it finish the disconnects.
func (cfg *config) socketPhases() {
	in := bufio.NewScanner(os.Stdin)
	warm, wres := cfg.connectAll(cfg.makeClients(0, cfg.warm), true, "sockets warm-up")
	wres["event"] = "warm"
	emit(wres)
	in.Scan() // the caller has taken its baseline
	ready, res := cfg.connectAll(cfg.makeClients(cfg.warm, cfg.warm+cfg.sockets), true, "sockets")
	res["event"] = "ready"
	emit(res)
	in.Scan() // the caller has measured the joined sockets
	start := time.Now()
	closeAll(ready)
	emit(map[string]any{"event": "closed", "closed": len(ready), "close_seconds": round(time.Since(start).Seconds(), 3)})
	in.Scan() // the server has handled the disconnects
	resumed, rr := cfg.reconnectAll(ready)
	emit(rr.into(map[string]any{"event": "resumed", "attempted": len(ready)}, "resume", "resumed", len(ready)))
	in.Scan() // the caller has measured the resumed sockets
	emitAlive(append(warm, resumed...))
}

// reconnectAll reconnects every client and resumes its room: the clock runs from the first dial
// to the last `resumed`, as for a server's worth of clients coming back at once.
func (cfg *config) reconnectAll(clients []*client) ([]*client, phaseResult) {
	logf("resume: reconnecting %d sockets, %d at a time", len(clients), cfg.concurrency)
	resumed, rr := runPhase(clients, cfg.concurrency, func(c *client) error {
		if err := cfg.connect(c); err != nil {
			return err
		}
		go cfg.reader(c)
		return cfg.resumeRoom(c)
	})
	logf("resume: %d/%d resumed in %.1fs", rr.ok, len(clients), rr.seconds)
	return resumed, rr
}

func raiseNofile() {
	var lim syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim) == nil && lim.Cur < lim.Max {
		lim.Cur = lim.Max
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	}
}

func main() {
	cfg := parseFlags()
	raiseNofile()
	go func() {
		time.Sleep(time.Duration(cfg.timeout * float64(time.Second)))
		fatal("hard time limit of %.0fs reached", cfg.timeout)
	}()
	switch cfg.mode {
	case "fanout":
		cfg.fanout()
	case "idle":
		cfg.idle()
	case "sockets":
		cfg.socketPhases()
	default:
		fatal("unknown -mode %q", cfg.mode)
	}
}
