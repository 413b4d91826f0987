# tlsmgr: build, install, test and package.
#
#   make                    static, reproducible build of ./tlsmgr
#   make check              the tests (TESTFLAGS passes flags to go test)
#   make install            binary into Postfix's daemon_directory as tlsmgr-sqlite,
#                           man page, docs; honours DESTDIR and PREFIX
#   make uninstall          removes what install put there
#   make deb                a Debian package, built offline with dpkg-deb
#   make lint               the man page through groff -ww
#   make daemon-dir         where install puts the binary
#
# Offline builds (make deb does one): Go takes modules from vendor/ when it
# exists (make vendor), or else from the module cache (go mod download
# once, while online); GOPROXY=off makes sure nothing is fetched.

VERSION    ?= 0.9.0
COMMIT     ?= $(shell git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
NAME       ?= tlsmgr-sqlite
PREFIX     ?= /usr/local
DESTDIR    ?=
# main.cf's daemon_directory; Postfix's built-in one when there is no main.cf yet.
DAEMON_DIR ?= $(shell postconf -h daemon_directory 2>/dev/null || postconf -dh daemon_directory 2>/dev/null || echo /usr/lib/postfix/sbin)
MANDIR     ?= $(PREFIX)/share/man/man8
DOCDIR     ?= $(PREFIX)/share/doc/$(NAME)
GO         ?= go
TESTFLAGS  ?=
DEB_ARCH   ?= $(shell dpkg --print-architecture 2>/dev/null || echo amd64)
DEB        := $(NAME)_$(VERSION)-1_$(DEB_ARCH).deb

# -trimpath and no VCS stamp: two builds of one commit are byte-identical.
BUILDFLAGS := -trimpath -buildvcs=false \
	-ldflags "-s -w -buildid= -X main.version=$(VERSION) -X main.commit=$(COMMIT)"
SOURCES    := $(wildcard *.go) schema.sql schema_shared.sql go.mod go.sum

.PHONY: all build check install uninstall deb lint vendor clean daemon-dir

all: build

build: tlsmgr

tlsmgr: $(SOURCES)
	CGO_ENABLED=0 $(GO) build $(BUILDFLAGS) -o $@ .

check:
	$(GO) test $(TESTFLAGS) ./...

install: build
	install -d $(DESTDIR)$(DAEMON_DIR) $(DESTDIR)$(MANDIR) $(DESTDIR)$(DOCDIR)
	install -m 0755 tlsmgr $(DESTDIR)$(DAEMON_DIR)/$(NAME)
	install -m 0644 tlsmgr.8 $(DESTDIR)$(MANDIR)/$(NAME).8
	install -m 0644 README.md tlsmgr.toml.example schema_shared.sql $(DESTDIR)$(DOCDIR)/

uninstall:
	rm -f $(DESTDIR)$(DAEMON_DIR)/$(NAME) $(DESTDIR)$(MANDIR)/$(NAME).8
	rm -f $(DESTDIR)$(DOCDIR)/README.md $(DESTDIR)$(DOCDIR)/tlsmgr.toml.example $(DESTDIR)$(DOCDIR)/schema_shared.sql
	-rmdir $(DESTDIR)$(DOCDIR)

lint:
	groff -ww -z -man tlsmgr.8

daemon-dir:
	@echo $(DAEMON_DIR)

vendor:
	$(GO) mod vendor

# The package puts the binary where Debian's postfix has daemon_directory,
# and never touches master.cf: README.Debian says how to switch.
deb: lint
	GOPROXY=off $(MAKE) build
	rm -rf build/deb && mkdir -p build/deb/DEBIAN
	$(MAKE) install DESTDIR=$(CURDIR)/build/deb PREFIX=/usr DAEMON_DIR=/usr/lib/postfix/sbin
	gzip -9n build/deb/usr/share/man/man8/$(NAME).8
	install -m 0644 debian/README.Debian debian/copyright build/deb/usr/share/doc/$(NAME)/
	sed -e 's/@VERSION@/$(VERSION)-1/' -e 's/@ARCH@/$(DEB_ARCH)/' \
	    -e "s/@SIZE@/$$(du -sk build/deb/usr | cut -f1)/" debian/control >build/deb/DEBIAN/control
	SOURCE_DATE_EPOCH=$$(git log -1 --format=%ct 2>/dev/null || echo 0) \
	    dpkg-deb --root-owner-group -Zxz --build build/deb $(DEB)

clean:
	rm -rf tlsmgr build *.deb
