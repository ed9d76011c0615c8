package main

// tls.go: self-signed RSA-2048 certificate for the API listener.

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"path/filepath"
	"strings"
	"time"
)

type tlsMaterial struct {
	cert     tls.Certificate
	certPath string
	keyPath  string
	sha1     string
	sha256   string
}

func thumb(b []byte) string {
	var parts []string
	for _, c := range b {
		parts = append(parts, fmt.Sprintf("%02X", c))
	}
	return strings.Join(parts, ":")
}

// loadOrCreateCert reuses dir/cert.pem+key.pem when valid, else generates them.
func loadOrCreateCert(dir string) (*tlsMaterial, error) {
	m := &tlsMaterial{certPath: filepath.Join(dir, "cert.pem"), keyPath: filepath.Join(dir, "key.pem")}
	if c, err := tls.LoadX509KeyPair(m.certPath, m.keyPath); err == nil {
		if x, err := x509.ParseCertificate(c.Certificate[0]); err == nil && time.Now().Before(x.NotAfter) {
			m.cert = c
			return m.finish()
		}
	}
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	serial, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "127.0.0.1", Organization: []string{"VMware, Inc (esxisim)"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().AddDate(10, 0, 0),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		IPAddresses:           []net.IP{net.ParseIP("127.0.0.1")},
		DNSNames:              []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)})
	if err := writeFileAtomic(m.keyPath, keyPEM, 0600); err != nil {
		return nil, err
	}
	if err := writeFileAtomic(m.certPath, certPEM, 0644); err != nil {
		return nil, err
	}
	m.cert, err = tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, err
	}
	return m.finish()
}

func (m *tlsMaterial) finish() (*tlsMaterial, error) {
	der := m.cert.Certificate[0]
	s1 := sha1.Sum(der)
	s256 := sha256.Sum256(der)
	m.sha1 = thumb(s1[:])
	m.sha256 = thumb(s256[:])
	return m, nil
}
