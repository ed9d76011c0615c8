package main

// faults.go: the faults of the reliability suite (docs/lab.md "Fault injection"): snapshot removals that
// fail, slow snapshot creates, SOAP requests answered with an HTTP error status, and a certificate
// that changes under the pinned thumbprint.

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"net/http"
	"time"

	"github.com/vmware/govmomi/vim25/types"
)

// injectedRemoveFailure is the "snapshot-remove-fail" fault: the removal fails the way a consolidation
// blocked by a locked delta does on ESXi, and the snapshot stays.
func (h *Host) injectedRemoveFailure(vm *VM, s *Snap) *OpFault {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.removeFail == 0 {
		return nil
	}
	if h.removeFail > 0 {
		h.removeFail--
	}
	file := h.dsPath(vm.Dir)
	for _, d := range vm.Disks {
		file = h.dsPath(d.Top.DescPath())
		break
	}
	logf("vm %s (%s): snapshot %d removal fails (injected)", vm.ID, vm.Name, s.UID)
	return opFault(&types.FileLocked{FileFault: types.FileFault{File: file}},
		"Unable to access file %s since it is locked", file)
}

// injectedAPIError is the "api-error" fault: true when this SOAP request is answered with the
// injected HTTP status (as ESXi's reverse proxy answers 503 while hostd restarts).
func (h *Host) injectedAPIError(w http.ResponseWriter) bool {
	h.mu.Lock()
	status := h.apiErrorStatus
	if h.apiErrorCount == 0 || status == 0 {
		h.mu.Unlock()
		return false
	}
	if h.apiErrorCount > 0 {
		h.apiErrorCount--
	}
	h.mu.Unlock()
	logf("SOAP request answered with HTTP %d (injected)", status)
	http.Error(w, http.StatusText(status), status)
	return true
}

// rotateCert is the "tls-rotate" fault: the API listener restarts with a new self-signed certificate
// (kept in memory only, so lab.json still names the pinned one); restoreCert puts the original back.
func (h *Host) rotateCert() error {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	serial, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "127.0.0.1", Organization: []string{"VMware, Inc (esxisim, rotated)"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().AddDate(1, 0, 0),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		IPAddresses:           []net.IP{net.ParseIP("127.0.0.1")},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return err
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)})
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return err
	}
	m, err := (&tlsMaterial{cert: pair}).finish()
	if err != nil {
		return err
	}
	h.apiDown()
	h.fe.mu.Lock()
	if h.origCert == nil {
		h.origCert = h.fe.cert
	}
	h.fe.cert = m
	h.fe.mu.Unlock()
	logf("certificate rotated: SHA-256 %s", m.sha256)
	return h.apiUp(h.fe.addr)
}

func (h *Host) restoreCert() error {
	h.fe.mu.Lock()
	orig := h.origCert
	h.fe.mu.Unlock()
	if orig == nil {
		return nil
	}
	h.apiDown()
	h.fe.mu.Lock()
	h.fe.cert, h.origCert = orig, nil
	h.fe.mu.Unlock()
	return h.apiUp(h.fe.addr)
}
