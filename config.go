// Configuration: Postfix main.cf (with its $-expansion), a TOML overlay and
// -o overrides, in that order of precedence, checked once at start-up.
//
// SECURITY: main.cf and the TOML file are trusted (root-owned in a Postfix
// installation); values are still checked so that a typo stops start-up
// with one line instead of a daemon that misbehaves later.

package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"github.com/BurntSushi/toml"
)

type paramKind int

const (
	kindString paramKind = iota
	kindInt
	kindTime
	kindBool // yes or no, as Postfix's get_mail_conf_bool
	kindLong // an int that may exceed 32 bits (byte counts)
)

// paramSpec describes one parameter that tlsmgr reads: its Postfix default
// (unexpanded, as postconf -d prints it) and the range Postfix enforces.
type paramSpec struct {
	kind     paramKind
	def      string
	min, max int64 // for kindInt and kindTime; max 0 means no upper bound
}

// maxTimerPeriod is Postfix's silent cap on the reseed and exchange periods
// (INT_MAX/255), so that period*r/255 cannot overflow.
const maxTimerPeriod = 8421504

// params is every parameter of postfix-tlsmgr.md §7.1 plus the ones of ours.
var params = map[string]paramSpec{
	"tls_random_source":                {kindString, "dev:/dev/urandom", 0, 0},
	"tls_random_bytes":                 {kindInt, "32", 1, 0},
	"tls_random_exchange_name":         {kindString, "${data_directory}/prng_exch", 0, 0},
	"tls_random_reseed_period":         {kindTime, "3600s", 1, 0},
	"tls_random_prng_update_period":    {kindTime, "3600s", 1, 0},
	"smtpd_tls_session_cache_database": {kindString, "", 0, 0},
	"smtpd_tls_session_cache_timeout":  {kindTime, "3600s", 0, 8640000},
	"smtp_tls_session_cache_database":  {kindString, "", 0, 0},
	"smtp_tls_session_cache_timeout":   {kindTime, "3600s", 0, 8640000},
	"lmtp_tls_session_cache_database":  {kindString, "", 0, 0},
	"lmtp_tls_session_cache_timeout":   {kindTime, "3600s", 0, 8640000},
	"smtpd_tls_loglevel":               {kindString, "0", 0, 0},
	"smtp_tls_loglevel":                {kindString, "0", 0, 0},
	"lmtp_tls_loglevel":                {kindString, "0", 0, 0},
	"queue_directory":                  {kindString, "/var/spool/postfix", 0, 0},
	"data_directory":                   {kindString, "/var/lib/postfix", 0, 0},
	"daemon_directory":                 {kindString, "/usr/lib/postfix/sbin", 0, 0},
	"mail_owner":                       {kindString, "postfix", 0, 0},
	"default_database_type":            {kindString, "hash", 0, 0},
	// Postfix 3.11: the type of cache files in main.cf's defaults, such as
	// $default_cache_db_type:$data_directory/smtpd_scache.
	"default_cache_db_type":     {kindString, "btree", 0, 0},
	"multi_instance_name":       {kindString, "", 0, 0},
	"syslog_name":               {kindString, "${multi_instance_name?{$multi_instance_name}:{postfix}}", 0, 0},
	"syslog_facility":           {kindString, "mail", 0, 0},
	"maillog_file":              {kindString, "", 0, 0},
	"maillog_file_prefixes":     {kindString, "/var, /dev/stdout", 0, 0},
	"postlog_service_name":      {kindString, "postlog", 0, 0},
	"myhostname":                {kindString, defaultHostname(), 0, 0},
	"daemon_timeout":            {kindTime, "18000s", 1, 0},
	"ipc_timeout":               {kindTime, "3600s", 1, 0},
	"max_idle":                  {kindTime, "100s", 1, 0},
	"max_use":                   {kindInt, "100", 1, 0},
	"tlsmgr_service_name":       {kindString, "tlsmgr", 0, 0},
	"tls_daemon_random_bytes":   {kindInt, "32", 1, 0},
	"tls_session_ticket_cipher": {kindString, "aes-256-cbc", 0, 0},
	"debugger_command":          {kindString, "", 0, 0},

	// Ours. tlsmgr_database is the one SQLite file that holds all three caches.
	"tlsmgr_database":         {kindString, "${data_directory}/tlsmgr.sqlite", 0, 0},
	"tlsmgr_sweep_batch_size": {kindInt, "16", 1, 1000000},
	"tlsmgr_max_connections":  {kindInt, "1000", 1, 1000000},

	// Bounded caches: past either limit the oldest sessions are evicted; 0
	// is unlimited. The defaults keep each cache near 50 MB at most.
	"tlsmgr_smtpd_session_cache_entry_limit": {kindInt, "50000", 0, 0},
	"tlsmgr_smtp_session_cache_entry_limit":  {kindInt, "50000", 0, 0},
	"tlsmgr_lmtp_session_cache_entry_limit":  {kindInt, "50000", 0, 0},
	"tlsmgr_smtpd_session_cache_size_limit":  {kindLong, "51200000", 0, 0},
	"tlsmgr_smtp_session_cache_size_limit":   {kindLong, "51200000", 0, 0},
	"tlsmgr_lmtp_session_cache_size_limit":   {kindLong, "51200000", 0, 0},
	// Opt-in: keep unexpired sessions, and the two ticket keys, across
	// restarts (postfix reload). Postfix keeps neither.
	"tlsmgr_keep_sessions":    {kindBool, "no", 0, 0},
	"tlsmgr_keep_ticket_keys": {kindBool, "no", 0, 0},
	// A statistics line in the log this often; 0 = never.
	"tlsmgr_statistics_log_period": {kindTime, "0s", 0, 0},
	// The shared store (shared.go): empty = no sharing.
	"tlsmgr_shared_database":         {kindString, "", 0, 0},
	"tlsmgr_shared_realm":            {kindString, "default", 0, 0},
	"tlsmgr_shared_caches":           {kindString, "smtpd", 0, 0},
	"tlsmgr_shared_secret_file":      {kindString, "${config_directory}/tlsmgr_shared.key", 0, 0},
	"tlsmgr_shared_database_timeout": {kindTime, "1s", 1, 60},
}

// readOnlyParams are set by the program itself; -o may name them (as
// master.cf lines written for Postfix 3.12 may) and is ignored.
var readOnlyParams = map[string]bool{"process_name": true, "service_name": true, "process_id": true}

// defaultHostname is Postfix's myhostname default: the host name, with
// $mydomain (or localdomain) added when it has no dot.
func defaultHostname() string {
	h, err := os.Hostname()
	if err != nil || h == "" {
		h = "localhost"
	}
	if !strings.Contains(h, ".") {
		h += ".${mydomain?{$mydomain}:{localdomain}}"
	}
	return h
}

// config holds raw (unexpanded) values; layers are consulted from the most
// specific down: -o overrides, TOML overlay, main.cf, built-in overrides of
// the mode (standalone), then the Postfix defaults above.
type config struct {
	file        string            // main.cf path, for messages
	mainCF      map[string]string // from main.cf
	overlay     map[string]string // from the TOML file
	overlayFile string            // its path, for messages
	overrides   map[string]string // from -o name=value
	builtin     map[string]string // mode defaults that replace Postfix's (standalone)
	always      map[string]string // process_name, process_id, service_name, config_directory
}

func newConfig() *config {
	return &config{
		mainCF:    map[string]string{},
		overlay:   map[string]string{},
		overrides: map[string]string{},
		builtin:   map[string]string{},
		always:    map[string]string{},
	}
}

// raw returns the unexpanded value of name and whether it is defined at all.
func (c *config) raw(name string) (string, bool) {
	// process_name, service_name, process_id and config_directory are
	// read-only: what main.cf or -o says of them is ignored (Postfix 3.12
	// enforces it too).
	for _, layer := range []map[string]string{c.always, c.overrides, c.overlay, c.mainCF, c.builtin} {
		if v, ok := layer[name]; ok {
			return v, true
		}
	}
	if spec, ok := params[name]; ok {
		return spec.def, true
	}
	return "", false
}

// str returns the expanded value of a parameter, or an error that names it.
func (c *config) str(name string) (string, error) {
	v, _ := c.raw(name)
	out, err := c.expand(v, 0)
	if err != nil {
		return "", fmt.Errorf("parameter %s: %v", name, err)
	}
	return out, nil
}

// readMainCF parses a main.cf file with Postfix's rules (postfix-tlsmgr.md §7.2).
func (c *config) readMainCF(path string, warn func(string, ...any)) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("open %s: %s", path, errText(err))
	}
	defer f.Close()
	c.file = path
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 16*1024*1024)
	var logical strings.Builder
	var startLine, lineNo int
	flush := func() error {
		if logical.Len() == 0 {
			return nil
		}
		line := logical.String()
		logical.Reset()
		name, value, err := splitNameValue(line)
		if err != nil {
			return fmt.Errorf("%s, line %d: %v: %q", path, startLine, err, line)
		}
		if old, dup := c.mainCF[name]; dup {
			warn("%s, line %d: overriding earlier entry: %s=%s", path, startLine, name, old)
		}
		c.mainCF[name] = value
		return nil
	}
	for sc.Scan() {
		lineNo++
		text := strings.TrimRight(sc.Text(), "\r")
		trimmed := strings.TrimLeft(text, " \t")
		if trimmed == "" || trimmed[0] == '#' {
			continue // comments and blank lines vanish, even inside a continuation
		}
		if text[0] == ' ' || text[0] == '\t' {
			if logical.Len() == 0 {
				warn("%s: line %d: ignoring leading whitespace text: %s", path, lineNo, trimmed)
				continue
			}
			logical.WriteString(text) // Postfix joins without the newline, keeping the indent
			continue
		}
		if err := flush(); err != nil {
			return err
		}
		startLine = lineNo
		logical.WriteString(text)
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("read %s: %v", path, err)
	}
	return flush()
}

// splitNameValue splits "name = value" the way Postfix's split_nameval does.
func splitNameValue(line string) (string, string, error) {
	s := strings.TrimLeft(line, " \t")
	end := strings.IndexAny(s, " \t=")
	if end <= 0 {
		if end == 0 {
			return "", "", errors.New("missing attribute name")
		}
		return "", "", errors.New("missing '=' after attribute name")
	}
	name := s[:end]
	rest := strings.TrimLeft(s[end:], " \t")
	if !strings.HasPrefix(rest, "=") {
		return "", "", errors.New("missing '=' after attribute name")
	}
	return name, strings.Trim(rest[1:], " \t"), nil
}

// setOverride records one -o name=value, as master.cf passes them.
func (c *config) setOverride(arg string) error {
	name, value, err := splitNameValue(arg)
	if err != nil {
		return fmt.Errorf("invalid \"-o %s\" option value: %v (use -o name=value)", arg, err)
	}
	if readOnlyParams[name] {
		return nil // ignored, as Postfix 3.12 daemons ignore it
	}
	if _, known := params[name]; !known {
		return fmt.Errorf("invalid \"-o %s\" option: %v", arg, unknownParam(name))
	}
	c.overrides[name] = value
	return nil
}

// readTOML reads the overlay: the same parameter names as main.cf, with
// string values, or integers for numeric and time parameters.
func (c *config) readTOML(path string) error {
	var doc map[string]any
	md, err := toml.DecodeFile(path, &doc)
	var parseErr toml.ParseError
	if errors.As(err, &parseErr) {
		return fmt.Errorf("TOML file %s, line %d: %s", path, parseErr.Position.Line, parseErr.Message)
	}
	if err != nil {
		return fmt.Errorf("TOML file %s: %v", path, err)
	}
	c.overlayFile = path
	text, _ := os.ReadFile(path)
	for _, k := range md.Keys() {
		name := k.String()
		at := fmt.Sprintf("TOML file %s, line %d", path, tomlKeyLine(string(text), k[0]))
		if _, isTable := doc[k[0]].(map[string]any); len(k) != 1 || isTable {
			return fmt.Errorf("%s: key %s: tables are not used; write parameters at the top level", at, name)
		}
		spec, known := params[name]
		if !known {
			return fmt.Errorf("%s: %v", at, unknownParam(name))
		}
		if b, ok := doc[name].(bool); ok && spec.kind == kindBool {
			c.overlay[name] = map[bool]string{true: "yes", false: "no"}[b]
			continue
		}
		switch v := doc[name].(type) {
		case string:
			c.overlay[name] = v
		case int64:
			if spec.kind == kindString || spec.kind == kindBool {
				return fmt.Errorf("%s: parameter %s = %d: want a string in quotes%s", at, name, v,
					map[bool]string{true: " or true/false", false: ""}[spec.kind == kindBool])
			}
			c.overlay[name] = strconv.FormatInt(v, 10)
		default:
			return fmt.Errorf("%s: parameter %s = %v: wrong type %s; want a string%s", at, name, v, md.Type(name),
				map[bool]string{true: " or an integer", false: ""}[spec.kind != kindString])
		}
	}
	return nil
}

// applyOverlays applies tlsmgr.toml (when named) and then the -o overrides, in
// that order of precedence, on top of main.cf.
func (c *config) applyOverlays(tomlFile string, overrides []string) error {
	if tomlFile != "" {
		if err := c.readTOML(tomlFile); err != nil {
			return err
		}
	}
	for _, o := range overrides {
		if err := c.setOverride(o); err != nil {
			return err
		}
	}
	return nil
}

// tomlKeyLine finds the line where a top-level key is set (the TOML
// decoder does not say); 0 when it cannot tell.
func tomlKeyLine(text, key string) int {
	re := regexp.MustCompile(`^\s*(` + regexp.QuoteMeta(key) + `|"` + regexp.QuoteMeta(key) + `")\s*[=.]`)
	for i, line := range strings.Split(text, "\n") {
		if re.MatchString(line) {
			return i + 1
		}
	}
	return 0
}

// unknownParam is the error for a name tlsmgr does not read, in TOML or
// -o alike, with the nearest name it does read.
func unknownParam(name string) error {
	hint := ""
	if near := nearestParam(name); near != "" {
		hint = fmt.Sprintf("; did you mean %q?", near)
	}
	return fmt.Errorf("unknown parameter %q%s (tlsmgr -d lists every parameter it reads)", name, hint)
}

// nearestParam is the known name with the smallest edit distance, if it
// is close enough to be a typo.
func nearestParam(name string) string {
	best, bestDist := "", len(name)/3+2
	for known := range params {
		if d := editDistance(name, known); d < bestDist || (d == bestDist && best != "" && known < best) {
			best, bestDist = known, d
		}
	}
	return best
}

// editDistance is Levenshtein's, over bytes (parameter names are ASCII).
func editDistance(a, b string) int {
	prev, cur := make([]int, len(b)+1), make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

// source says where a parameter's value comes from.
func (c *config) source(name string) string {
	switch {
	case hasKey(c.overrides, name):
		return "-o"
	case hasKey(c.overlay, name):
		return c.overlayFile
	case hasKey(c.mainCF, name):
		return c.file
	case hasKey(c.builtin, name):
		return "standalone default"
	}
	return "default"
}

func hasKey(m map[string]string, k string) bool { _, ok := m[k]; return ok }

// printNonDefault is tlsmgr -n, like postconf -n: every parameter tlsmgr
// reads that is set somewhere, with where, as name = value (unexpanded).
func (c *config) printNonDefault(w io.Writer) {
	for _, name := range sortedParams() {
		if src := c.source(name); src != "default" {
			v, _ := c.raw(name)
			fmt.Fprintf(w, "%s = %s\t# %s\n", name, v, src)
		}
	}
}

// printDefaults is tlsmgr -d, like postconf -d: every parameter tlsmgr
// reads, with Postfix's default (ours are marked).
func printDefaults(w io.Writer) {
	for _, name := range sortedParams() {
		mark := ""
		if strings.HasPrefix(name, "tlsmgr_") && name != "tlsmgr_service_name" {
			mark = "\t# tlsmgr's own"
		}
		fmt.Fprintf(w, "%s = %s%s\n", name, params[name].def, mark)
	}
}

func sortedParams() []string {
	names := make([]string, 0, len(params))
	for n := range params {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// validate checks every numeric and time parameter; the first bad one stops
// start-up with Postfix's message.
func (c *config) validate() error {
	for _, n := range sortedParams() {
		if params[n].kind == kindBool {
			if _, err := c.boolean(n); err != nil {
				return err
			}
			continue
		}
		if params[n].kind == kindString {
			if _, err := c.str(n); err != nil {
				return err
			}
			continue
		}
		if _, err := c.num(n); err != nil {
			return err
		}
	}
	return nil
}

// num returns an int or time parameter in its unit (seconds for times).
func (c *config) num(name string) (int64, error) {
	spec := params[name]
	v, err := c.str(name)
	if err != nil {
		return 0, err
	}
	var n int64
	switch spec.kind {
	case kindInt, kindLong:
		n, err = strconv.ParseInt(v, 10, map[paramKind]int{kindInt: 32, kindLong: 64}[spec.kind])
		if err != nil {
			return 0, fmt.Errorf("bad numerical configuration: %s = %s (want a decimal integer)", name, v)
		}
		if n < spec.min {
			return 0, fmt.Errorf("invalid %s parameter value %d < %d", name, n, spec.min)
		}
		if spec.max > 0 && n > spec.max {
			return 0, fmt.Errorf("invalid %s parameter value %d > %d", name, n, spec.max)
		}
	case kindTime:
		n, err = parseTime(v, 's')
		if err != nil {
			return 0, fmt.Errorf("parameter %s: bad time value or unit: %s (want digits and one of s m h d w)", name, v)
		}
		if n < spec.min {
			return 0, fmt.Errorf("invalid %s: %d (min %d)", name, n, spec.min)
		}
		if spec.max > 0 && n > spec.max {
			return 0, fmt.Errorf("invalid %s: %d (max %d)", name, n, spec.max)
		}
	default:
		return 0, fmt.Errorf("parameter %s is not numeric", name)
	}
	return n, nil
}

// boolean is a yes/no parameter; Postfix accepts those two words only, in
// any case.
func (c *config) boolean(name string) (bool, error) {
	v, err := c.str(name)
	if err != nil {
		return false, err
	}
	switch strings.ToLower(v) {
	case "yes":
		return true, nil
	case "no":
		return false, nil
	}
	return false, fmt.Errorf("bad boolean configuration: %s = %s (want yes or no)", name, v)
}

// mustBool, mustNum and mustStr are boolean, num and str for parameters
// that validate() has already accepted. Should one fail all the same, the
// error is fatal and logged where the mail log is, as Postfix's are (a
// panic would go to stderr, which under master(8) goes nowhere).
func (c *config) mustBool(name string) bool {
	b, err := c.boolean(name)
	if err != nil {
		msg.fatal("%v", err)
	}
	return b
}

func (c *config) mustNum(name string) int64 {
	n, err := c.num(name)
	if err != nil {
		msg.fatal("%v", err)
	}
	return n
}

func (c *config) mustStr(name string) string {
	s, err := c.str(name)
	if err != nil {
		msg.fatal("%v", err)
	}
	return s
}

// parseTime follows Postfix's conv_time: decimal digits, then an optional
// unit letter; only the first character after the digits counts ("1hour"
// is 3600).
func parseTime(s string, defUnit byte) (int64, error) {
	i := 0
	for i < len(s) && s[i] >= '0' && s[i] <= '9' {
		i++
	}
	if i == 0 {
		return 0, errors.New("no digits")
	}
	n, err := strconv.ParseInt(s[:i], 10, 64)
	if err != nil {
		return 0, err
	}
	unit := defUnit
	if i < len(s) {
		unit = s[i]
	}
	var mult int64
	switch unit {
	case 's':
		mult = 1
	case 'm':
		mult = 60
	case 'h':
		mult = 3600
	case 'd':
		mult = 86400
	case 'w':
		mult = 604800
	default:
		return 0, fmt.Errorf("unknown unit %q", unit)
	}
	if n > (1<<31-1)/mult {
		return 0, errors.New("overflow")
	}
	return n * mult, nil
}

// expand implements Postfix's $name expansion (postfix-tlsmgr.md §7.3).
func (c *config) expand(s string, depth int) (string, error) {
	if depth > 100 {
		return "", errors.New("unreasonable macro call nesting")
	}
	if !strings.Contains(s, "$") {
		return s, nil
	}
	var out strings.Builder
	for i := 0; i < len(s); {
		if s[i] != '$' {
			out.WriteByte(s[i])
			i++
			continue
		}
		i++
		if i >= len(s) {
			out.WriteByte('$')
			break
		}
		switch s[i] {
		case '$':
			out.WriteByte('$')
			i++
		case '{', '(':
			open, closer := s[i], map[byte]byte{'{': '}', '(': ')'}[s[i]]
			depthBr, j := 1, i+1
			for ; j < len(s); j++ {
				if s[j] == open {
					depthBr++
				} else if s[j] == closer {
					depthBr--
					if depthBr == 0 {
						break
					}
				}
			}
			if j >= len(s) {
				return "", errors.New("truncated macro reference: \"" + s[i-1:] + "\"")
			}
			v, err := c.expandBraced(s[i+1:j], depth)
			if err != nil {
				return "", err
			}
			out.WriteString(v)
			i = j + 1
		default:
			j := i
			for j < len(s) && isNameChar(s[j]) {
				j++
			}
			if j == i {
				return "", errors.New("empty macro name")
			}
			v, err := c.lookupExpanded(s[i:j], depth)
			if err != nil {
				return "", err
			}
			out.WriteString(v)
			i = j
		}
	}
	return out.String(), nil
}

func isNameChar(b byte) bool {
	return b == '_' || (b >= 'a' && b <= 'z') || (b >= 'A' && b <= 'Z') || (b >= '0' && b <= '9')
}

func (c *config) lookupExpanded(name string, depth int) (string, error) {
	v, ok := c.raw(name)
	if !ok {
		return "", nil // undefined names expand to nothing, as in Postfix
	}
	return c.expand(v, depth+1)
}

// expandBraced handles the inside of ${...}: a name, a conditional
// (?text, :text, ?{a}:{b}) or a relational expression {a} OP {b} ? {t} : {f}.
func (c *config) expandBraced(inner string, depth int) (string, error) {
	body := strings.TrimSpace(inner)
	if strings.HasPrefix(body, "{") {
		return c.expandRelational(body, depth)
	}
	j := 0
	for j < len(body) && isNameChar(body[j]) {
		j++
	}
	if j == 0 {
		return "", errors.New("empty macro name")
	}
	name, rest := body[:j], strings.TrimLeft(body[j:], " \t")
	if rest == "" {
		return c.lookupExpanded(name, depth)
	}
	val, err := c.lookupExpanded(name, depth)
	if err != nil {
		return "", err
	}
	set := val != ""
	op := rest[0]
	if op != '?' && op != ':' {
		return "", fmt.Errorf("unexpected text after macro name %q: %q", name, rest)
	}
	text := strings.TrimLeft(rest[1:], " \t")
	var whenTrue, whenFalse string
	if op == '?' && strings.HasPrefix(text, "{") {
		t1, after, err := takeBraced(text)
		if err != nil {
			return "", err
		}
		after = strings.TrimSpace(after)
		whenTrue = t1
		if after != "" {
			if after[0] != ':' {
				return "", fmt.Errorf("bad conditional after {%s}: %q", t1, after)
			}
			after = strings.TrimSpace(after[1:])
			if strings.HasPrefix(after, "{") {
				t2, tail, err := takeBraced(after)
				if err != nil {
					return "", err
				}
				if strings.TrimSpace(tail) != "" {
					return "", fmt.Errorf("unexpected text after {%s}: %q", t2, tail)
				}
				whenFalse = t2
			} else {
				whenFalse = after
			}
		}
	} else {
		if strings.HasPrefix(text, "{") {
			t, tail, err := takeBraced(text)
			if err != nil {
				return "", err
			}
			if strings.TrimSpace(tail) != "" {
				return "", fmt.Errorf("unexpected text after {%s}: %q", t, tail)
			}
			text = t
		} else {
			text = rest[1:]
		}
		if op == '?' {
			whenTrue = text
		} else {
			whenFalse = text
		}
	}
	if set {
		return c.expand(whenTrue, depth+1)
	}
	return c.expand(whenFalse, depth+1)
}

// takeBraced splits "{text}rest" into text and rest, honouring nesting.
func takeBraced(s string) (string, string, error) {
	n := 0
	for i := 0; i < len(s); i++ {
		switch s[i] {
		case '{':
			n++
		case '}':
			n--
			if n == 0 {
				return strings.TrimSpace(s[1:i]), s[i+1:], nil
			}
		}
	}
	return "", "", errors.New("truncated macro reference: \"" + s + "\"")
}

// expandRelational evaluates ${{a} OP {b} ? {t} : {f}} (Postfix 3.0+).
func (c *config) expandRelational(body string, depth int) (string, error) {
	left, rest, err := takeBraced(body)
	if err != nil {
		return "", err
	}
	rest = strings.TrimSpace(rest)
	var op string
	for _, cand := range []string{"==", "!=", "<=", ">=", "<", ">"} {
		if strings.HasPrefix(rest, cand) {
			op = cand
			break
		}
	}
	if op == "" {
		return "", fmt.Errorf("unknown operator in %q (allowed: == != < <= > >=)", body)
	}
	right, rest, err := takeBraced(strings.TrimSpace(rest[len(op):]))
	if err != nil {
		return "", err
	}
	rest = strings.TrimSpace(rest)
	if !strings.HasPrefix(rest, "?") {
		return "", fmt.Errorf("missing '?' in %q", body)
	}
	whenTrue, rest, err := takeBraced(strings.TrimSpace(rest[1:]))
	if err != nil {
		return "", err
	}
	rest = strings.TrimSpace(rest)
	whenFalse := ""
	if strings.HasPrefix(rest, ":") {
		whenFalse, rest, err = takeBraced(strings.TrimSpace(rest[1:]))
		if err != nil {
			return "", err
		}
	}
	if strings.TrimSpace(rest) != "" {
		return "", fmt.Errorf("unexpected text %q in %q", rest, body)
	}
	a, err := c.expand(left, depth+1)
	if err != nil {
		return "", err
	}
	b, err := c.expand(right, depth+1)
	if err != nil {
		return "", err
	}
	var cmp int
	an, aerr := strconv.ParseUint(a, 10, 64)
	bn, berr := strconv.ParseUint(b, 10, 64)
	if aerr == nil && berr == nil {
		cmp = map[bool]int{true: -1, false: 0}[an < bn] + map[bool]int{true: 1, false: 0}[an > bn]
	} else {
		cmp = strings.Compare(a, b)
	}
	var ok bool
	switch op {
	case "==":
		ok = cmp == 0
	case "!=":
		ok = cmp != 0
	case "<":
		ok = cmp < 0
	case "<=":
		ok = cmp <= 0
	case ">":
		ok = cmp > 0
	case ">=":
		ok = cmp >= 0
	}
	if ok {
		return c.expand(whenTrue, depth+1)
	}
	return c.expand(whenFalse, depth+1)
}

// mainCFPath finds main.cf: an explicit directory, else $MAIL_CONFIG, else
// /etc/postfix, as Postfix daemons do.
func mainCFPath(dir string) string {
	if dir == "" {
		dir = os.Getenv("MAIL_CONFIG")
	}
	if dir == "" {
		dir = "/etc/postfix"
	}
	return filepath.Join(dir, "main.cf")
}
