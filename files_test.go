package main

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// needRoot skips a test that needs root, saying why; in CI (CI=true), which
// runs as root, it fails instead, so that what the test covers is never
// silently left out.
func needRoot(t *testing.T, what string) {
	t.Helper()
	if os.Geteuid() != 0 {
		skipOutsideCI(t, "%s needs root; CI runs this as root", what)
	}
}

// skipOutsideCI skips with the reason, or fails under CI=true.
func skipOutsideCI(t *testing.T, format string, args ...any) {
	t.Helper()
	if os.Getenv("CI") != "" {
		t.Fatalf("cannot run in CI: "+format, args...)
	}
	t.Skipf(format, args...)
}

// fileState is what a planted link's target must still look like afterwards.
type fileState struct {
	exists  bool
	content string
	mode    os.FileMode
	uid     uint32
	mtime   time.Time
}

func stateOf(t *testing.T, path string) fileState {
	t.Helper()
	fi, err := os.Lstat(path)
	if err != nil {
		return fileState{}
	}
	b, _ := os.ReadFile(path)
	return fileState{true, string(b), fi.Mode(), fi.Sys().(*syscall.Stat_t).Uid, fi.ModTime()}
}

// fileIdentity is which file a name leads to, and whose it is.
type fileIdentity struct {
	dev, ino uint64
	mode     os.FileMode
	uid      uint32
}

func identityOf(t *testing.T, path string) fileIdentity {
	t.Helper()
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	return fileIdentity{st.Dev, st.Ino, fi.Mode(), st.Uid}
}

// Every kind of file that data_directory may hold instead of ours, and
// what openOrCreateDataFile must make of it: refuse it with one warning,
// replace it with a regular file of ours, and leave whatever a link points
// to exactly as it was.
func TestPlantedDataFiles(t *testing.T) {
	for _, tc := range []struct {
		name, why string
		plant     func(t *testing.T, path, outside string)
	}{
		{"symlink to an existing file", "it is a symbolic link", func(t *testing.T, path, outside string) {
			os.WriteFile(outside, []byte("precious"), 0644)
			os.Symlink(outside, path)
		}},
		{"dangling symlink", "it is a symbolic link", func(t *testing.T, path, outside string) {
			os.Symlink(outside, path)
		}},
		{"hard link", "it has 2 hard links", func(t *testing.T, path, outside string) {
			os.WriteFile(outside, []byte("precious"), 0644)
			if err := os.Link(outside, path); err != nil {
				skipOutsideCI(t, "no hard links in the temp directory: %v", err)
			}
		}},
		{"FIFO", "it is not a regular file", func(t *testing.T, path, outside string) {
			syscall.Mkfifo(path, 0600)
		}},
		{"directory", "it is not a regular file", func(t *testing.T, path, outside string) {
			os.Mkdir(path, 0700)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			path, outside := filepath.Join(dir, "prng_exch"), filepath.Join(t.TempDir(), "target")
			tc.plant(t, path, outside)
			before := stateOf(t, outside)
			logged := captureLog(t)
			f, err := openOrCreateDataFile(path, "PRNG exchange file", os.Geteuid(), func() []byte { return []byte("new") }, nil)
			if tc.name == "directory" {
				// A directory cannot be unlinked as a file: refused, not replaced.
				if err == nil {
					t.Fatal("a directory was accepted")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if want := "warning: refusing PRNG exchange file " + path + ": " + tc.why + "; replacing it"; !strings.Contains(logged(), want) {
				t.Errorf("log %q, want %q", logged(), want)
			}
			if after := stateOf(t, outside); after != before {
				t.Errorf("the target changed: %+v, was %+v", after, before)
			}
			fi, err := os.Lstat(path)
			if err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm() != 0600 {
				t.Fatalf("replacement: %v %v", fi.Mode(), err)
			}
			if b, _ := os.ReadFile(path); string(b) != "new" {
				t.Errorf("replacement holds %q", b)
			}
		})
	}
}

// A file of another user is refused (as root, which can make one).
func TestForeignDataFileRefused(t *testing.T) {
	needRoot(t, "making a file of another user")
	dir := t.TempDir()
	path := filepath.Join(dir, "prng_exch")
	os.WriteFile(path, bytes.Repeat([]byte{1}, 1024), 0644) // root's
	uid, _ := nobody(t)
	_, err := openDataFile(path, uid)
	var bad *badFileError
	if !errors.As(err, &bad) || !strings.HasPrefix(bad.why, "it is owned by uid 0, not by mail_owner") {
		t.Errorf("got %v", err)
	}
}

// An existing good file is opened as it is, its mode forced to 0600
// through the descriptor.
func TestExistingDataFileKept(t *testing.T) {
	path := filepath.Join(t.TempDir(), "prng_exch")
	os.WriteFile(path, []byte("old"), 0640)
	f, err := openOrCreateDataFile(path, "PRNG exchange file", os.Geteuid(), func() []byte { return []byte("new") }, nil)
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	fi, _ := os.Stat(path)
	if b, _ := os.ReadFile(path); string(b) != "old" || fi.Mode().Perm() != 0600 {
		t.Errorf("content %q, mode %v", b, fi.Mode())
	}
}

// A new file appears under its name only with its content in it.
func TestCreateDataFileIsAtomic(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "prng_exch")
	f, err := createDataFile(path, os.Geteuid(), bytes.Repeat([]byte{9}, 1024))
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	if b, _ := os.ReadFile(path); len(b) != 1024 {
		t.Errorf("%d bytes", len(b))
	}
	if _, err := createDataFile(path, os.Geteuid(), nil); err == nil {
		t.Error("created over an existing name")
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("directory holds %d entries, want only %s", len(entries), path)
	}
}

// One tlsmgr per database: a second one is refused, whoever it is; one
// that waits gets the lock when the first lets go; a lock file that is
// wrong but held is never replaced.
func TestDatabaseLock(t *testing.T) {
	dir := t.TempDir()
	db := filepath.Join(dir, "tlsmgr.sqlite")
	first, err := lockDatabase(db, os.Geteuid(), 0)
	if err != nil {
		t.Fatal(err)
	}
	_, err = lockDatabase(db, os.Geteuid(), 0)
	var inUse *errDatabaseInUse
	if !errors.As(err, &inUse) || inUse.Error() != "session cache database "+db+" is in use by another tlsmgr" {
		t.Fatalf("second lock: %v", err)
	}
	inUse.readHolder() // after the privilege drop: the lock file is mail_owner's
	if inUse.Error() != "session cache database "+db+" is in use by another tlsmgr (pid "+strconv.Itoa(os.Getpid())+")" {
		t.Fatalf("second lock, holder read: %v", err)
	}
	time.AfterFunc(300*time.Millisecond, func() { first.Close() })
	start := time.Now()
	second, err := lockDatabase(db, os.Geteuid(), 5*time.Second)
	if err != nil {
		t.Fatalf("waiting for the lock: %v", err)
	}
	if d := time.Since(start); d < 250*time.Millisecond {
		t.Errorf("got the lock after %v, before the first let go", d)
	}
	second.Close()

	if os.Geteuid() == 0 { // a held lock file of another owner: refused, not replaced
		held, _ := lockDatabase(db, 0, 0)
		uid, _ := nobody(t)
		if _, err := lockDatabase(db, uid, 0); !errors.As(err, &inUse) {
			t.Errorf("held lock of another owner: %v", err)
		}
		held.Close()
	}
}
