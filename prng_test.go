package main

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"math/big"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// drbgVector is one NIST CAVP Hash_DRBG SHA-256 record: instantiate,
// optionally reseed, generate twice; the second output must match.
type drbgVector struct {
	name                                      string
	entropy, nonce, personalization           string
	entropyReseed, additionalReseed, returned string
	additional                                [2]string
	reseeds                                   bool
}

func unhex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatalf("bad hex %q: %v", s, err)
	}
	return b
}

func (v drbgVector) check(t *testing.T) {
	t.Helper()
	var d hashDRBG
	d.instantiate(unhex(t, v.entropy), unhex(t, v.nonce), unhex(t, v.personalization))
	if v.reseeds {
		d.reseed(unhex(t, v.entropyReseed), unhex(t, v.additionalReseed))
	}
	want := unhex(t, v.returned)
	got := make([]byte, len(want))
	for _, add := range v.additional {
		if err := d.generate(got, unhex(t, add)); err != nil {
			t.Fatalf("%s: generate: %v", v.name, err)
		}
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s: got %x, want %x", v.name, got, want)
	}
}

// The literal vectors run anywhere: COUNT = 0 of each of the four groups
// (personalization and additional input of 0 or 256 bits) of both files.
func TestHashDRBGLiteralVectors(t *testing.T) {
	if len(literalDRBGVectors) < 8 {
		t.Fatalf("only %d literal vectors", len(literalDRBGVectors))
	}
	for i, v := range literalDRBGVectors {
		v.name = "literal " + string(rune('0'+i))
		v.reseeds = v.entropyReseed != ""
		v.check(t)
	}
}

// TestHashDRBGNISTFiles runs all 480 records of the shared NIST files.
// TestAddInto checks V + x mod 2^440 against math/big for every length of
// x the DRBG adds (a counter byte, the 8-byte reseed counter, a 32-byte
// hash, the 55-byte C) and the lengths around the 64-bit words, with
// carries that run off the top.
func TestAddInto(t *testing.T) {
	mod := new(big.Int).Lsh(big.NewInt(1), 8*seedLenBytes)
	rng := rand.New(rand.NewPCG(1, 2))
	for _, n := range []int{0, 1, 7, 8, 9, 15, 16, 32, 54, 55, 56, 70} {
		for _, fill := range []string{"random", "all ones"} {
			for range 50 {
				var dst [seedLenBytes]byte
				src := make([]byte, n)
				for i := range dst {
					dst[i] = byte(rng.Uint32())
				}
				for i := range src {
					src[i] = byte(rng.Uint32())
				}
				if fill == "all ones" {
					for i := range dst {
						dst[i] = 0xff
					}
				}
				want := new(big.Int).Add(new(big.Int).SetBytes(dst[:]), new(big.Int).SetBytes(src))
				want.Mod(want, mod)
				addInto(&dst, src)
				var wantBytes [seedLenBytes]byte
				want.FillBytes(wantBytes[:])
				if dst != wantBytes {
					t.Fatalf("%d-byte addend, %s: got %x, want %x", n, fill, dst, wantBytes)
				}
			}
		}
	}
}

func TestHashDRBGNISTFiles(t *testing.T) {
	dir := "../shared/reference/drbg"
	files, _ := filepath.Glob(filepath.Join(dir, "*.fax"))
	if len(files) == 0 {
		skipOutsideCI(t, "no NIST vectors in %s (the shared folder is absent); the literal vectors still ran", dir)
	}
	total := 0
	for _, file := range files {
		for _, v := range readFax(t, file) {
			v.check(t)
			total++
		}
	}
	if total != 480 {
		t.Errorf("ran %d NIST vectors, want 480", total)
	}
}

func readFax(t *testing.T, path string) []drbgVector {
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []drbgVector
	var cur *drbgVector
	adds := 0
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		key, value, ok := strings.Cut(line, "=")
		if !ok || strings.HasPrefix(line, "[") || strings.HasPrefix(line, "#") {
			continue
		}
		key, value = strings.TrimSpace(key), strings.TrimSpace(value)
		switch key {
		case "COUNT":
			out = append(out, drbgVector{name: filepath.Base(path) + " COUNT " + value})
			cur, adds = &out[len(out)-1], 0
		case "EntropyInput":
			cur.entropy = value
		case "Nonce":
			cur.nonce = value
		case "PersonalizationString":
			cur.personalization = value
		case "EntropyInputReseed":
			cur.entropyReseed, cur.reseeds = value, true
		case "AdditionalInputReseed":
			cur.additionalReseed = value
		case "AdditionalInput":
			cur.additional[adds] = value
			adds++
		case "ReturnedBits":
			cur.returned = value
		}
	}
	return out
}

func TestPoolOutputsDiffer(t *testing.T) {
	p, err := newPool()
	if err != nil {
		t.Fatal(err)
	}
	a, b := make([]byte, 32), make([]byte, 32)
	p.read(a)
	p.read(b)
	if bytes.Equal(a, b) || bytes.Equal(a, make([]byte, 32)) {
		t.Fatalf("pool repeated itself or gave zeros: %x %x", a, b)
	}
	big := make([]byte, maxBytesPerCall*2+7) // more than one generate call
	if err := p.read(big); err != nil {
		t.Fatal(err)
	}
}

// captureLog collects what msg writes to stderr during a test.
func captureLog(t *testing.T) func() string {
	t.Helper()
	var buf lockedBuffer
	msg.mu.Lock()
	old, oldStderr := msg.out, msg.stderr
	msg.out, msg.stderr = &buf, true
	msg.limited = nil // each test sees its first rate-limited warning
	msg.mu.Unlock()
	t.Cleanup(func() {
		msg.mu.Lock()
		msg.out, msg.stderr = old, oldStderr
		msg.mu.Unlock()
	})
	return func() string {
		msg.mu.Lock()
		defer msg.mu.Unlock()
		return buf.String()
	}
}

type lockedBuffer struct{ bytes.Buffer }

func TestEntropySources(t *testing.T) {
	dir := t.TempDir()
	plain := filepath.Join(dir, "seedfile")
	os.WriteFile(plain, bytes.Repeat([]byte{7}, 100), 0600)

	t.Run("dev reads min(tls_random_bytes, 255)", func(t *testing.T) {
		s := openEntropySource("dev:/dev/urandom", 300)
		b, err := s.gather()
		if err != nil || len(b) != 255 {
			t.Fatalf("got %d bytes, %v; want 255", len(b), err)
		}
	})
	t.Run("dev that cannot be opened warns, and is reopened once it exists", func(t *testing.T) {
		logged := captureLog(t)
		missing := filepath.Join(t.TempDir(), "missing")
		s := openEntropySource("dev:"+missing, 32)
		if want := "warning: cannot open entropy device " + missing + ": no such file or directory; reseeding from the kernel alone until it works"; !strings.Contains(logged(), want) {
			t.Errorf("log %q, want %q", logged(), want)
		}
		if _, err := s.gather(); err == nil || err.Error() != "cannot open entropy device "+missing+": no such file or directory" {
			t.Errorf("gather: %v", err)
		}
		os.WriteFile(missing, bytes.Repeat([]byte{5}, 64), 0600) // the device appears
		if b, err := s.gather(); err != nil || len(b) != 32 {
			t.Errorf("gather after the source came back: %d bytes, %v", len(b), err)
		}
	})
	t.Run("dev that fails to read is closed and retried", func(t *testing.T) {
		s := openEntropySource("dev:"+dir, 32) // a directory opens, but read fails
		for range 2 {
			_, err := s.gather()
			if err == nil || err.Error() != "cannot read from entropy device "+dir+": is a directory" {
				t.Errorf("gather: %v", err)
			}
		}
	})
	t.Run("plain file is read once", func(t *testing.T) {
		s := openEntropySource(plain, 32)
		b, err := s.gather()
		if err != nil || !bytes.Equal(b, bytes.Repeat([]byte{7}, 32)) {
			t.Fatalf("first read: %x, %v", b, err)
		}
		if b, err := s.gather(); len(b) != 0 || err != nil {
			t.Errorf("second read gave %d bytes, %v", len(b), err)
		}
	})
	t.Run("plain file that is missing warns, then is retried", func(t *testing.T) {
		logged := captureLog(t)
		s := openEntropySource(dir+"/nope", 32)
		if !strings.Contains(logged(), "warning: cannot open entropy file "+dir+"/nope: no such file or directory") {
			t.Errorf("log %q", logged())
		}
		if _, err := s.gather(); err == nil || err.Error() != "cannot open entropy file "+dir+"/nope: no such file or directory" {
			t.Errorf("gather: %v", err)
		}
	})
	t.Run("empty source warns twice and gives nothing", func(t *testing.T) {
		logged := captureLog(t)
		s := openEntropySource("", 32)
		want := "warning: no entropy source specified with parameter tls_random_source"
		if !strings.Contains(logged(), want) || !strings.Contains(logged(), "warning: encryption keys etc. may be predictable") {
			t.Errorf("log %q", logged())
		}
		if b, err := s.gather(); len(b) != 0 || err != nil {
			t.Errorf("gather: %d bytes, %v", len(b), err)
		}
	})
	t.Run("egd speaks 01 NN and reads count plus bytes", func(t *testing.T) {
		sock := filepath.Join(dir, "egd")
		requests := fakeEGD(t, sock, 40)
		s := openEntropySource("egd:"+sock, 300)
		b, err := s.gather()
		if err != nil || len(b) != 40 {
			t.Fatalf("got %d bytes, %v", len(b), err)
		}
		if req := <-requests; !bytes.Equal(req, []byte{0x01, 0xff}) {
			t.Errorf("EGD request %x, want 01ff", req)
		}
	})
	t.Run("egd that answers 0 bytes is reconnected", func(t *testing.T) {
		sock := filepath.Join(dir, "egd0")
		fakeEGD(t, sock, 0)
		s := openEntropySource("egd:"+sock, 32)
		_, err := s.gather()
		if err == nil || err.Error() != "lost connection to EGD server "+sock+": the EGD server has no entropy" {
			t.Errorf("gather: %v", err)
		}
		if s.egd != nil {
			t.Error("the failed EGD connection was kept")
		}
	})
	t.Run("egd that is not there", func(t *testing.T) {
		logged := captureLog(t)
		s := openEntropySource("egd:"+dir+"/noegd", 32)
		if !strings.Contains(logged(), "warning: cannot connect to EGD server "+dir+"/noegd") {
			t.Errorf("log %q", logged())
		}
		if _, err := s.gather(); err == nil {
			t.Error("gather from a missing EGD server succeeded")
		}
	})
}

// fakeEGD answers one EGD request with n bytes and reports what it was asked.
func fakeEGD(t *testing.T, path string, n int) <-chan []byte {
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	got := make(chan []byte, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		req := make([]byte, 2)
		if _, err := c.Read(req); err != nil {
			return
		}
		got <- req
		c.Write(append([]byte{byte(n)}, bytes.Repeat([]byte{9}, n)...))
	}()
	return got
}

func TestExchangeFileLifecycle(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "prng_exch")
	p, _ := newPool()
	x, err := openExchangeFile(path, os.Geteuid(), p)
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(path)
	if err != nil || st.Mode().Perm() != 0600 {
		t.Fatalf("created with %v, %v; want 0600", st.Mode(), err)
	}
	if err := x.update(p); err != nil {
		t.Fatal(err)
	}
	first, _ := os.ReadFile(path)
	if len(first) != exchangeFileSize {
		t.Fatalf("exchange file has %d bytes, want %d", len(first), exchangeFileSize)
	}
	x.update(p)
	second, _ := os.ReadFile(path)
	if bytes.Equal(first, second) || len(second) != exchangeFileSize {
		t.Errorf("update did not rewrite the file (%d bytes)", len(second))
	}

	t.Run("contents feed the pool", func(t *testing.T) {
		out := func(content []byte) []byte {
			var d pool
			d.drbg.instantiate(make([]byte, 32), make([]byte, 16), nil)
			f := filepath.Join(t.TempDir(), "x")
			os.WriteFile(f, content, 0600)
			x, _ := openExchangeFile(f, os.Geteuid(), &d)
			x.update(&d)
			b, _ := os.ReadFile(f)
			return b
		}
		if bytes.Equal(out([]byte("one")), out([]byte("two"))) {
			t.Error("different exchange contents gave the same pool output")
		}
	})
	t.Run("short, long and garbage files are accepted", func(t *testing.T) {
		for _, content := range [][]byte{nil, []byte("x"), bytes.Repeat([]byte{0xff}, 5000)} {
			f := filepath.Join(t.TempDir(), "x")
			os.WriteFile(f, content, 0600)
			x, err := openExchangeFile(f, os.Geteuid(), p)
			if err != nil {
				t.Fatal(err)
			}
			if err := x.update(p); err != nil {
				t.Errorf("%d-byte file: %v", len(content), err)
			}
			b, _ := os.ReadFile(f)
			if len(b) != exchangeFileSize {
				t.Errorf("%d-byte file became %d bytes, want always %d", len(content), len(b), exchangeFileSize)
			}
		}
	})
	t.Run("removed file is noticed", func(t *testing.T) {
		if x.removed() {
			t.Fatal("file reported removed while present")
		}
		os.Remove(path)
		if !x.removed() {
			t.Error("removal not noticed")
		}
	})
	t.Run("unopenable file is Postfix's fatal message", func(t *testing.T) {
		_, err := openExchangeFile(filepath.Join(dir, "no/such/dir/prng_exch"), os.Geteuid(), p)
		if err == nil || !strings.HasPrefix(err.Error(), "tls_prng_exch_open: cannot open PRNG exchange file ") {
			t.Errorf("got %v", err)
		}
	})
}

var literalDRBGVectors = []drbgVector{
	{ // sha256_hash_noreseed.fax, COUNT = 0, personalization 0 bits, additional input 0 bits
		entropy:         "a65ad0f345db4e0effe875c3a2e71f42c7129d620ff5c119a9ef55f05185e0fb",
		nonce:           "8581f9317517276e06e9607ddbcbcc2e",
		personalization: "",
		additional:      [2]string{"", ""},
		returned:        "d3e160c35b99f340b2628264d1751060e0045da383ff57a57d73a673d2b8d80daaf6a6c35a91bb4579d73fd0c8fed111b0391306828adfed528f018121b3febdc343e797b87dbb63db1333ded9d1ece177cfa6b71fe8ab1da46624ed6415e51ccde2c7ca86e283990eeaeb91120415528b2295910281b02dd431f4c9f70427df",
	},
	{ // sha256_hash_noreseed.fax, COUNT = 0, personalization 0 bits, additional input 256 bits
		entropy:         "9b6d88373841458da926cc51f83922d363f0f80f90a2f5505c04033824ef7385",
		nonce:           "82b21ff47bb5e1b33288b22f3856886b",
		personalization: "",
		additional:      [2]string{"45d21d94ae1ea460857b50b5b240d943d42160e4c12377e0f817b79e92530bc1", "ea432e31cc94c20d66fb13d1ef42a5f62b024134fc635aa1279a6179204731ca"},
		returned:        "3d23d0fc03936766a1e1330393e8ff6211149f3d0758db038da1c833ca8e5265c2a9ff6c8e0836904c5fcd3e61b1c77d613dc6bdaf6437573a618e3e75e455338a7f9a41300da8fd2da408cf095ff7eae1686d60ce9c2f547d0515da91600201c8374b7af8a5f49a6381aaca394c65d451341a0ae1546cd57e0d9167a6b5397d",
	},
	{ // sha256_hash_noreseed.fax, COUNT = 0, personalization 256 bits, additional input 0 bits
		entropy:         "dfeabab904bfe93a37bb5b1ea4a696f881ab5ab4be87ffbf2d4e8cdfaabb37fd",
		nonce:           "a2d458b475053a0346b57fc518849ba1",
		personalization: "d15d5d9a4a3a41877b4ea98dbda5079ee393f6ab24105dbd70f5bf145772b15c",
		additional:      [2]string{"", ""},
		returned:        "86d8c63ed4a8a19f3429b4dd57ede5ca573e861712e631400645ceee763c37cf950bdcc4d9c886ead3f0f1bf46a63bf22bd2eb39b2dac61d2e8c8f29e26045b3db56b2265adc8152d4f736c09ee90364a1e265eb5e77b0c5988c8fa52717fd33b6da760e78f2a7c27065227c47ac2134b95b7dadbf96e4ea2dad78ef200e174b",
	},
	{ // sha256_hash_noreseed.fax, COUNT = 0, personalization 256 bits, additional input 256 bits
		entropy:         "68c43a008fe46a823d260a9d7fa388fb9e401f0197e7e758a744b4babb3f4651",
		nonce:           "eb6825777856331884aaf3751b3e4006",
		personalization: "23ce0d32cbf2d26467f0d62acff1a3acbaa6d2746dc3ee7aa9d32c880788afc8",
		additional:      [2]string{"a31b9f13b58d4fa2f8d8ac42b62a207ff647339a146bd8b268b33d4aff57adbd", "d34fc6504eca4b568193c75357b0d3821a48c77ff80d6dbd21c6cf045ff489cf"},
		returned:        "abb4ecbacd4e8fa943c7221aed433861c3b203232657ec4c417d021f905d911db1058ff1e11e272232482ec96bae7cb4efc135502dbe41724077077f6de79b713670c385d04644e1281c3e582e0016255abbe5f8c06d0de57160559f0c08f7fb5be3563c649966190f8d3261364447537de2c7371c6e8c308933d27145bf90ab",
	},
	{ // sha256_hash_pr_false.fax, COUNT = 0, personalization 0 bits, additional input 0 bits
		entropy:          "63363377e41e86468deb0ab4a8ed683f6a134e47e014c700454e81e95358a569",
		nonce:            "808aa38f2a72a62359915a9f8a04ca68",
		personalization:  "",
		entropyReseed:    "e62b8a8ee8f141b6980566e3bfe3c04903dad4ac2cdf9f2280010a6739bc83d3",
		additionalReseed: "",
		additional:       [2]string{"", ""},
		returned:         "04eec63bb231df2c630a1afbe724949d005a587851e1aa795e477347c8b056621c18bddcdd8d99fc5fc2b92053d8cfacfb0bb8831205fad1ddd6c071318a6018f03b73f5ede4d4d071f9de03fd7aea105d9299b8af99aa075bdb4db9aa28c18d174b56ee2a014d098896ff2282c955a81969e069fa8ce007a180183a07dfae17",
	},
	{ // sha256_hash_pr_false.fax, COUNT = 0, personalization 0 bits, additional input 256 bits
		entropy:          "9cfb7ad03be487a3b42be06e9ae44f283c2b1458cec801da2ae6532fcb56cc4c",
		nonce:            "a20765538e8db31295747ec922c13a69",
		personalization:  "",
		entropyReseed:    "96bc8014f90ebdf690db0e171b59cc46c75e2e9b8e1dc699c65c03ceb2f4d7dc",
		additionalReseed: "6fea0894052dab3c44d503950c7c72bd7b87de87cb81d3bb51c32a62f742286d",
		additional:       [2]string{"d3467c78563b74c13db7af36c2a964820f2a9b1b167474906508fdac9b2049a6", "5840a11cc9ebf77b963854726a826370ffdb2fc2b3d8479e1df5dcfa3dddd10b"},
		returned:         "71c1154a2a7a3552413970bf698aa02f14f8ea95e861f801f463be27868b1b14b1b4babd9eba5915a6414ab1104c8979b1918f3094925aeab0d07d2037e613b63cbd4f79d9f95c84b47ed9b77230a57515c211f48f4af6f5edb2c308b33905db308cf88f552c8912c49b34e66c026e67b302ca65b187928a1aba9a49edbfe190",
	},
	{ // sha256_hash_pr_false.fax, COUNT = 0, personalization 256 bits, additional input 0 bits
		entropy:          "b87bb4de5c148d964fc0cb612d69295671780b4270fe32bf389b6f49488efe13",
		nonce:            "27eb37a0c695c4ee3c9b70b7f6b33492",
		personalization:  "52321406ac8a9c266b1f8d811bb871269e5824b59a0234f01d358193523bbb7c",
		entropyReseed:    "7638267f534c4e6ee22cc6ca6ed824fd5d3d387c00b89dd791eb5ac9766385b8",
		additionalReseed: "",
		additional:       [2]string{"", ""},
		returned:         "de01c061651bab3cef2fc4ea89a56b6e86e74b2e9fd11ed671c97c813778a06a2c1f41b41e754a5257750c6bde9601da9d67d8d9564f4a8538b92516a2dacc496dee257b85393f2a01ad59aa3257f1b6da9566e3706d2d6d4a26e511b0c64d7dc223acb24827178afa43ca8d5a66f983d6929dc61564c4c14fc32d85765a23f7",
	},
	{ // sha256_hash_pr_false.fax, COUNT = 0, personalization 256 bits, additional input 256 bits
		entropy:          "6c623aea73bc8a59e28c6cd9c7c7ec8ca2e75190bd5dcae5978cf0c199c23f4f",
		nonce:            "e55db067a0ed537e66886b7cda02f772",
		personalization:  "1e59d798810083d1ff848e90b25c9927e3dfb55a0888b0339566a9f9ca7542dc",
		entropyReseed:    "9ab40164744c7d00c78b4196f6f917ec33d70030a0812cd4606c5a25387568a9",
		additionalReseed: "4e8bead7cbba7a7bc9ae1e1617222c4139661347599950e7225d1e2faa5d57f5",
		additional:       [2]string{"dcb22a5d9f149858636f3ede2253e419816fb7b1103194451ed6a573a8fe6271", "8f9d5c78cdabc32e71ac3b3c49239caddf96053250f4fd92056efbd0be487d36"},
		returned:         "6e98a3b1f686f6ffa79355c9d8a5ab7f93312159d52659a2298315f10007c71adabc0b5ccb4164c0949fbdb221b43acdb62bed3099596f2d7bd5d0048173dd2360a543b234ab61a441ddb9299af84ca45c6e618fd521366dbf509d4ec06174da924361d642b107e5564ac1b32340dd2f3158bf4c00bcb4dcf12c6d67af4b74ee",
	},
}

// A wiped pool refuses to generate, cannot be reseeded back to life, and
// its refusal reaches clients as a failure, never as predictable bytes.
func TestWipedPoolRefuses(t *testing.T) {
	p, err := newPool()
	if err != nil {
		t.Fatal(err)
	}
	keys := newTicketKeys(3600, p)
	p.wipe()
	out := bytes.Repeat([]byte{0xAA}, 32)
	if err := p.read(out); err == nil {
		t.Fatalf("a wiped pool generated %x", out)
	}
	if err := p.mix([]byte("fresh entropy")); err == nil {
		t.Error("a wiped pool accepted a reseed")
	}
	if err := p.read(out); err == nil {
		t.Error("a wiped pool generated after a reseed")
	}
	var never hashDRBG
	if err := never.generate(out, nil); err == nil {
		t.Error("an uninstantiated DRBG generated")
	}
	if d := p.randomDelay(60); d != 60*time.Second {
		t.Errorf("timer delay from a wiped pool: %v, want the whole period", d)
	}
	srv := &server{pool: p, keys: keys, streamName: "tlsmgr socket"}
	captureLog(t)
	for req, want := range map[string]string{
		"request\x00seed\x00size\x0032\x00\x00":    "status\x004294967295\x00seed\x00\x00\x00",
		"request\x00tktkey\x00keyname\x00\x00\x00": "status\x004294967295\x00keybuf\x00\x00\x00",
	} {
		if got := answer(t, srv, req); got != want {
			t.Errorf("%q from a wiped pool: %q, want %q", req, got, want)
		}
	}
}
