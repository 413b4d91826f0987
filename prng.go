// The PRNG pool: NIST SP 800-90A Hash_DRBG over SHA-256, seeded from the
// kernel, from tls_random_source (dev:, egd: or a plain file) and from the
// exchange file, stirred with the time of day on every request, and saved
// to the exchange file at start, at random intervals and on a clean exit.
//
// SECURITY: seed bytes and pool state are never logged; the state is
// overwritten when the process exits. A weak or broken external source
// cannot weaken the pool below the kernel's entropy, which is always in it.

package main

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"
)

const (
	seedLenBytes     = 55      // seedlen = 440 bits for SHA-256
	maxBytesPerCall  = 1 << 16 // 2^19 bits per generate request
	reseedInterval   = 1 << 48
	exchangeFileSize = 1024 // what Postfix reads and writes
	sourceTimeout    = 10 * time.Second
)

var errNeedReseed = errors.New("Hash_DRBG: reseed required")

// hashDRBG is the bare mechanism of SP 800-90A §10.1.1; it is not safe for
// concurrent use (pool wraps it with a mutex).
type hashDRBG struct {
	v, c          [seedLenBytes]byte
	reseedCounter uint64
}

// hashDF is the derivation function of SP 800-90A §10.3.1.
func hashDF(outLen int, inputs ...[]byte) []byte {
	out := make([]byte, 0, outLen+sha256.Size)
	var hdr [5]byte
	binary.BigEndian.PutUint32(hdr[1:], uint32(outLen*8))
	for counter := byte(1); len(out) < outLen; counter++ {
		hdr[0] = counter
		h := sha256.New()
		h.Write(hdr[:])
		for _, in := range inputs {
			h.Write(in)
		}
		out = h.Sum(out)
	}
	return out[:outLen]
}

func (d *hashDRBG) instantiate(entropy, nonce, personalization []byte) {
	copy(d.v[:], hashDF(seedLenBytes, entropy, nonce, personalization))
	copy(d.c[:], hashDF(seedLenBytes, []byte{0}, d.v[:]))
	d.reseedCounter = 1
}

func (d *hashDRBG) reseed(entropy, additional []byte) {
	copy(d.v[:], hashDF(seedLenBytes, []byte{1}, d.v[:], entropy, additional))
	copy(d.c[:], hashDF(seedLenBytes, []byte{0}, d.v[:]))
	d.reseedCounter = 1
}

// addInto sets dst = (dst + src) mod 2^440, both big-endian; src may be shorter.
func addInto(dst *[seedLenBytes]byte, src []byte) {
	carry := 0
	for i, j := seedLenBytes-1, len(src)-1; i >= 0; i, j = i-1, j-1 {
		sum := int(dst[i]) + carry
		if j >= 0 {
			sum += int(src[j])
		}
		dst[i] = byte(sum)
		carry = sum >> 8
	}
}

// generate fills out (at most maxBytesPerCall) per SP 800-90A §10.1.1.4.
func (d *hashDRBG) generate(out, additional []byte) error {
	if len(out) > maxBytesPerCall {
		return fmt.Errorf("Hash_DRBG: %d bytes requested, at most %d per call", len(out), maxBytesPerCall)
	}
	if d.reseedCounter > reseedInterval {
		return errNeedReseed
	}
	if len(additional) > 0 {
		h := sha256.New()
		h.Write([]byte{2})
		h.Write(d.v[:])
		h.Write(additional)
		var w [sha256.Size]byte
		addInto(&d.v, h.Sum(w[:0]))
	}
	data := d.v
	var block [sha256.Size]byte
	for n := 0; n < len(out); n += sha256.Size {
		block = sha256.Sum256(data[:])
		copy(out[n:], block[:])
		addInto(&data, []byte{1})
	}
	var prefixed [1 + seedLenBytes]byte // 0x03 || V
	prefixed[0] = 3
	copy(prefixed[1:], d.v[:])
	block = sha256.Sum256(prefixed[:])
	addInto(&d.v, block[:])
	addInto(&d.v, d.c[:])
	var ctr [8]byte
	binary.BigEndian.PutUint64(ctr[:], d.reseedCounter)
	addInto(&d.v, ctr[:])
	d.reseedCounter++
	clear(block[:])
	clear(data[:])
	return nil
}

func (d *hashDRBG) wipe() {
	clear(d.v[:])
	clear(d.c[:])
	d.reseedCounter = 0
}

// pool is the process's one source of random bytes: seed replies, ticket
// keys, the exchange file and the timer intervals all come from it.
type pool struct {
	mu   sync.Mutex
	drbg hashDRBG
}

// newPool instantiates from the kernel, with time and pid as personalization.
func newPool() (*pool, error) {
	entropy := make([]byte, 48) // 32 bytes of entropy plus a 16-byte nonce
	if _, err := io.ReadFull(rand.Reader, entropy); err != nil {
		return nil, fmt.Errorf("read kernel entropy: %v", err)
	}
	p := &pool{}
	p.drbg.instantiate(entropy[:32], entropy[32:], timePid())
	clear(entropy)
	return p, nil
}

func timePid() []byte {
	var b [20]byte
	binary.BigEndian.PutUint64(b[:], uint64(time.Now().UnixNano()))
	binary.BigEndian.PutUint32(b[8:], uint32(os.Getpid()))
	binary.BigEndian.PutUint64(b[12:], uint64(time.Now().Unix())^uint64(os.Getpid()))
	return b[:]
}

// read fills out, stirring in the time of day as additional input.
func (p *pool) read(out []byte) error {
	var now [8]byte
	binary.BigEndian.PutUint64(now[:], uint64(time.Now().UnixNano()))
	p.mu.Lock()
	defer p.mu.Unlock()
	for len(out) > 0 {
		n := min(len(out), maxBytesPerCall)
		err := p.drbg.generate(out[:n], now[:])
		if errors.Is(err, errNeedReseed) {
			fresh := make([]byte, 32)
			if _, err := io.ReadFull(rand.Reader, fresh); err != nil {
				return err
			}
			p.drbg.reseed(fresh, now[:])
			continue
		}
		if err != nil {
			return err
		}
		out = out[n:]
	}
	return nil
}

// Read makes the pool an io.Reader.
func (p *pool) Read(out []byte) (int, error) {
	if err := p.read(out); err != nil {
		return 0, err
	}
	return len(out), nil
}

// mix reseeds with external bytes; the kernel's share stays in V.
func (p *pool) mix(entropy []byte) {
	var now [8]byte
	binary.BigEndian.PutUint64(now[:], uint64(time.Now().UnixNano()))
	p.mu.Lock()
	p.drbg.reseed(entropy, now[:])
	p.mu.Unlock()
}

// randomDelay returns period*r/255 seconds for a fresh random byte r, as
// Postfix schedules its reseed and exchange timers.
func (p *pool) randomDelay(period int64) time.Duration {
	period = min(period, maxTimerPeriod)
	var r [1]byte
	p.read(r[:])
	return time.Duration(period*int64(r[0])/255) * time.Second
}

func (p *pool) wipe() {
	p.mu.Lock()
	p.drbg.wipe()
	p.mu.Unlock()
}

// entropySource is tls_random_source, opened before chroot.
type entropySource struct {
	spec   string // the parameter value, for messages
	kind   string // "dev", "egd", "file" or ""
	path   string
	bytes  int // tls_random_bytes
	file   *os.File
	egd    net.Conn
	broken bool // could not be opened: the first reseed exits to reopen
}

// openEntropySource opens the source; failures are warnings, as in Postfix,
// and make the first reseed exit so that master(8) restarts us.
func openEntropySource(spec string, bytes int) *entropySource {
	s := &entropySource{spec: spec, bytes: bytes}
	switch {
	case spec == "":
		msg.warn("no entropy source specified with parameter tls_random_source")
		msg.warn("encryption keys etc. may be predictable")
	case strings.HasPrefix(spec, "dev:"):
		s.kind, s.path = "dev", spec[len("dev:"):]
		f, err := os.Open(s.path)
		if err != nil {
			msg.warn("cannot open entropy device %s: %v", s.path, errText(err))
			s.broken = true
			break
		}
		s.file = f
	case strings.HasPrefix(spec, "egd:"):
		s.kind, s.path = "egd", spec[len("egd:"):]
		c, err := net.DialTimeout("unix", s.path, sourceTimeout)
		if err != nil {
			msg.warn("cannot connect to EGD server %s: %v", s.path, errText(err))
			s.broken = true
			break
		}
		s.egd = c
	default:
		s.kind, s.path = "file", spec
		f, err := os.Open(s.path)
		if err != nil {
			s.broken = true // silent here, as in Postfix; the first reseed exits to reopen
			break
		}
		s.file = f
	}
	return s
}

// errText renders an error like C's %m: the errno text without Go's "op path:".
func errText(err error) string {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return errno.Error()
	}
	return err.Error()
}

// errExitToReopen tells the caller to save the exchange file and exit 0, so
// that master(8) starts a fresh process that opens the source again.
type errExitToReopen struct{ text string }

func (e errExitToReopen) Error() string { return e.text }

// gather reads one reseed's worth of bytes.
func (s *entropySource) gather() ([]byte, error) {
	n := min(s.bytes, 255)
	switch {
	case s.broken:
		return nil, errExitToReopen{fmt.Sprintf("exiting to reopen external entropy source %s", s.spec)}
	case s.kind == "dev":
		buf := make([]byte, n)
		got, err := readWithTimeout(s.file, buf)
		if got <= 0 {
			if err == nil {
				err = io.EOF
			}
			return nil, errExitToReopen{fmt.Sprintf("cannot read from entropy device %s: %s -- exiting to reopen", s.path, errText(err))}
		}
		return buf[:got], nil
	case s.kind == "egd":
		buf, err := s.egdRead(n)
		if err != nil {
			return nil, errExitToReopen{fmt.Sprintf("lost connection to EGD server %s -- exiting to reconnect", s.path)}
		}
		return buf, nil
	case s.kind == "file":
		// A plain file is read once, then the source counts as empty.
		defer func() { s.file.Close(); s.file = nil; s.kind = "" }()
		if _, err := s.file.Seek(0, io.SeekStart); err != nil {
			msg.warn("cannot read from entropy file %s: %s", s.path, errText(err))
			return nil, nil
		}
		buf, err := io.ReadAll(io.LimitReader(s.file, int64(s.bytes)))
		if err != nil {
			msg.warn("cannot read from entropy file %s: %s", s.path, errText(err))
		}
		return buf, nil
	}
	return nil, nil
}

// readWithTimeout bounds a read from a device that might block forever.
func readWithTimeout(f *os.File, buf []byte) (int, error) {
	type result struct {
		n   int
		err error
	}
	done := make(chan result, 1)
	go func() {
		n, err := f.Read(buf)
		done <- result{n, err}
	}()
	select {
	case r := <-done:
		return r.n, r.err
	case <-time.After(sourceTimeout):
		return 0, errors.New("timeout")
	}
}

// egdRead speaks the EGD protocol: 0x01 N, then a count byte and that many bytes.
func (s *entropySource) egdRead(n int) ([]byte, error) {
	s.egd.SetDeadline(time.Now().Add(sourceTimeout))
	if _, err := s.egd.Write([]byte{0x01, byte(n)}); err != nil {
		return nil, err
	}
	var count [1]byte
	if _, err := io.ReadFull(s.egd, count[:]); err != nil {
		return nil, err
	}
	if count[0] == 0 {
		return nil, errors.New("EGD server has no entropy")
	}
	buf := make([]byte, count[0])
	if _, err := io.ReadFull(s.egd, buf); err != nil {
		return nil, err
	}
	return buf, nil
}

// active says whether the source still has anything to give (Postfix runs
// the reseed timer only for a non-empty source).
func (s *entropySource) active() bool { return s.kind != "" || s.broken }

// exchangeFile is tls_random_exchange_name, opened before chroot.
type exchangeFile struct {
	mu   sync.Mutex
	path string
	file *os.File
}

// openExchangeFile opens or creates the file, mode 0600, owned by uid/gid
// (mail_owner) when we run as root.
func openExchangeFile(path string, uid, gid int) (*exchangeFile, error) {
	f, err := openOwned(path, uid, gid)
	if err != nil {
		return nil, fmt.Errorf("tls_prng_exch_open: cannot open PRNG exchange file %s: %s", path, errText(err))
	}
	return &exchangeFile{path: path, file: f}, nil
}

// removed reports a file that was unlinked while we hold it open.
func (x *exchangeFile) removed() bool {
	var st syscall.Stat_t
	if err := syscall.Fstat(int(x.file.Fd()), &st); err != nil {
		return true
	}
	return st.Nlink == 0
}

// update reads what is there into the pool and writes 1024 fresh bytes,
// under an exclusive flock so that concurrent tlsmgr processes take turns.
func (x *exchangeFile) update(p *pool) error {
	x.mu.Lock()
	defer x.mu.Unlock()
	fd := int(x.file.Fd())
	if err := syscall.Flock(fd, syscall.LOCK_EX); err != nil {
		return fmt.Errorf("cannot lock PRNG exchange file %s: %s", x.path, errText(err))
	}
	defer syscall.Flock(fd, syscall.LOCK_UN)
	buf := make([]byte, exchangeFileSize)
	defer clear(buf)
	n, err := x.file.ReadAt(buf, 0)
	if err != nil && err != io.EOF {
		return fmt.Errorf("cannot read PRNG exchange file %s: %s", x.path, errText(err))
	}
	if n > 0 {
		p.mix(buf[:n])
	}
	if err := p.read(buf); err != nil {
		return fmt.Errorf("cannot generate PRNG exchange data: %v", err)
	}
	if _, err := x.file.WriteAt(buf, 0); err != nil {
		return fmt.Errorf("cannot write PRNG exchange file %s: %s", x.path, errText(err))
	}
	return nil
}
